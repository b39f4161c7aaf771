"""Capacity (least recently used first) and time-to-live bookkeeping over entry ids.

The policy tracks ids only; the engine asks it which ids to drop and removes them everywhere.
Expiry is lazy: ``pop_expired(now)`` returns the ids whose deadline has passed (a heap, so each call
costs O(expired · log n)), and the engine calls it before every lookup and insert.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Optional, Protocol


class Eviction(Protocol):
    """What the engine needs from an eviction policy: ids in, ids to drop out."""

    capacity: Optional[int]
    default_ttl_s: Optional[float]

    def expires_at(self, now: float, ttl_s: Optional[float] = None) -> Optional[float]: ...

    def admit(self, entry_id: int, expires_at: Optional[float] = None) -> None: ...

    def touch(self, entry_id: int) -> None: ...

    def forget(self, entry_id: int) -> None: ...

    def pop_expired(self, now: float) -> list[int]: ...

    def pop_over_capacity(self) -> list[int]: ...

    def order(self) -> list[int]: ...

    def clear(self) -> None: ...


class LRUEviction:
    """LRU order with an optional ``capacity`` (entries) and default TTL ``default_ttl_s`` (seconds)."""

    def __init__(self, capacity: Optional[int] = None, default_ttl_s: Optional[float] = None):
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1 or None, got {capacity}")
        if default_ttl_s is not None and not default_ttl_s > 0:
            raise ValueError(f"default TTL must be > 0 seconds or None, got {default_ttl_s}")
        self.capacity = capacity
        self.default_ttl_s = default_ttl_s
        self._recency: OrderedDict[int, None] = OrderedDict()  # least recent first
        self._deadline: dict[int, float] = {}
        self._heap: list[tuple[float, int]] = []  # (deadline, id); stale pairs skipped on pop

    def expires_at(self, now: float, ttl_s: Optional[float] = None) -> Optional[float]:
        """Deadline for an entry inserted at ``now`` (``ttl_s`` overrides the default; None = never)."""
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        if ttl is None:
            return None
        if not ttl > 0:
            raise ValueError(f"ttl_s must be > 0 seconds, got {ttl}")
        return now + ttl

    def admit(self, entry_id: int, expires_at: Optional[float] = None) -> None:
        """Track a new entry as the most recently used."""
        self._recency[entry_id] = None
        self._recency.move_to_end(entry_id)
        if expires_at is not None:
            self._deadline[entry_id] = expires_at
            heapq.heappush(self._heap, (expires_at, entry_id))

    def touch(self, entry_id: int) -> None:
        """Mark an entry as just used (a hit)."""
        if entry_id in self._recency:
            self._recency.move_to_end(entry_id)

    def forget(self, entry_id: int) -> None:
        self._recency.pop(entry_id, None)
        self._deadline.pop(entry_id, None)

    def pop_expired(self, now: float) -> list[int]:
        """Ids whose deadline is ≤ now (no longer tracked afterwards)."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            deadline, entry_id = heapq.heappop(self._heap)
            if self._deadline.get(entry_id) == deadline:
                self.forget(entry_id)
                out.append(entry_id)
        if len(self._heap) > 2 * len(self._deadline) + 64:  # drop stale pairs of removed entries
            self._heap = [(d, i) for i, d in self._deadline.items()]
            heapq.heapify(self._heap)
        return out

    def pop_over_capacity(self) -> list[int]:
        """Least recently used ids beyond capacity (no longer tracked afterwards)."""
        out = []
        while self.capacity is not None and len(self._recency) > self.capacity:
            entry_id, _ = self._recency.popitem(last=False)
            self._deadline.pop(entry_id, None)
            out.append(entry_id)
        return out

    def order(self) -> list[int]:
        """Tracked ids, least recently used first."""
        return list(self._recency)

    def clear(self) -> None:
        self._recency.clear()
        self._deadline.clear()
        self._heap.clear()

    def __len__(self) -> int:
        return len(self._recency)
