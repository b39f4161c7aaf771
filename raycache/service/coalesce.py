"""Work the request path does once instead of many times: recent prompt vectors and in-flight misses.

* :class:`VectorMemo`: the vectors (and long-prompt tail keys) of recently embedded prompts, so a
  store after a missed lookup of the same text reuses the lookup's vector instead of embedding the
  prompt a second time (the chat proxy's miss, and a cache-aside client's lookup-then-store).
* :class:`SingleFlight`: concurrent identical chat misses wait for the first one's upstream call
  (and its store) instead of each calling the upstream.

Both live in one process and are touched only from its event loop (no locks).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from contextlib import asynccontextmanager
from typing import AsyncIterator, Hashable, Optional, Sequence

import numpy as np

VECTOR_MEMO_SIZE = 4096  # prompts; 384-dim float32 vectors: ~6 MB


class VectorMemo:
    """LRU map prompt text -> (its vector, its tail key), at most ``capacity`` texts.

    A prompt's vector depends on its text only (not on its namespace or history), so the key is the
    exact text. Vectors are copied rows (they never pin the batch they came from); tail keys are kept
    only when the embedder reported them (None: the caller's cache computes them itself).
    """

    def __init__(self, capacity: int = VECTOR_MEMO_SIZE):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._tails: dict[str, Optional[str]] = {}
        self.reused = 0  # vectors served from the memo (texts not embedded again)

    def get(self, text: str) -> Optional[tuple[np.ndarray, Optional[str]]]:
        vector = self._vectors.get(text)
        if vector is None:
            return None
        self._vectors.move_to_end(text)
        self.reused += 1
        return vector, self._tails.get(text)

    def put(self, texts: Sequence[str], vectors: np.ndarray, tails: Optional[Sequence[str]]) -> None:
        if not self.capacity:
            return
        for i, text in enumerate(texts):
            self._vectors[text] = np.array(vectors[i], dtype=np.float32, copy=True)
            self._vectors.move_to_end(text)
            self._tails[text] = None if tails is None else tails[i]
        while len(self._vectors) > self.capacity:
            old, _ = self._vectors.popitem(last=False)
            self._tails.pop(old, None)

    def __len__(self) -> int:
        return len(self._vectors)


class SingleFlight:
    """At most one leader per key at a time; the others wait until it is done.

    ``async with flights.join(key) as leader:`` -- ``leader`` is True for the first caller (do the
    work inside the block); a caller that finds a leader in flight waits until that leader's block
    ends, however it ends (success, error, cancellation), and gets False: it should then look for the
    leader's result (e.g. look the cache up again) and do the work itself only if there is none.
    """

    def __init__(self) -> None:
        self._flights: dict[Hashable, asyncio.Event] = {}
        self.coalesced = 0  # callers that waited for a leader

    @asynccontextmanager
    async def join(self, key: Hashable) -> AsyncIterator[bool]:
        done = self._flights.get(key)
        if done is not None:
            self.coalesced += 1
            await done.wait()
            yield False
            return
        done = self._flights[key] = asyncio.Event()
        try:
            yield True
        finally:
            del self._flights[key]
            done.set()

    def __len__(self) -> int:
        return len(self._flights)
