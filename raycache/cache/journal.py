"""What a cache changed since its last flush: the engine records each store, use and removal here
(O(1) each, under its lock) while a segment log is attached, and ``take_changes`` hands the record
over as :class:`Changes` (O(changes) under the lock, never O(entries)).

Recency is exact: every entry stored or used since the last flush is more recent than every entry
that was not, so the log's LRU order is the previous order without the changed ids, followed by the
changed ids in the order of their last use (``Journal.order``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from raycache.cache.persist import Snapshot


class Journal:
    """Changes since the last take. ``order``: ids stored or used, least recently used first;
    ``vectors``: id -> unit vector float32 [dim] of the entries stored since (the index holds the
    only other copy); ``removed``: ids removed that were stored before the last take; ``full``: the
    contents were replaced wholesale (a restore), so the next take is the whole cache."""

    __slots__ = ("order", "vectors", "removed", "full")

    def __init__(self, full: bool = False) -> None:
        self.order: OrderedDict[int, None] = OrderedDict()
        self.vectors: dict[int, np.ndarray] = {}
        self.removed: list[int] = []
        self.full = full

    def stored(self, entry_id: int, vector: np.ndarray) -> None:
        self.order[entry_id] = None
        self.vectors[entry_id] = vector

    def used(self, entry_id: int) -> None:
        if entry_id in self.order:
            self.order.move_to_end(entry_id)
        else:
            self.order[entry_id] = None

    def dropped(self, entry_id: int) -> None:
        self.order.pop(entry_id, None)
        if self.vectors.pop(entry_id, None) is None:  # stored before the last take: a tombstone
            self.removed.append(entry_id)

    def __len__(self) -> int:
        return len(self.order) + len(self.removed)


@dataclass
class Changes:
    """One flush's worth of changes (``SemanticCache.take_changes``).

    ``order`` int64 [m]: every id stored or used since the previous take and still present, least
    recently used first; ``last_access`` float64 [m]: their last use (cache clock, s); ``stored``
    bool [m]: which of them were stored since (the others were only used); ``entries``: those stored
    ones, in the same order (``entries.ids == order[stored]``); ``removed`` int64 [r]: ids removed
    since (stored before). ``full``: ``entries`` is the whole cache in LRU order (``order``/``removed``
    empty), to be written as a new base.
    ``entries.meta`` carries dim, next_id, model and saved_at as in a snapshot.
    """

    entries: Snapshot
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    last_access: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    removed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    stored: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    full: bool = False

    @property
    def empty(self) -> bool:
        return not self.full and not len(self.order) and not len(self.removed)
