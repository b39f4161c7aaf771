"""The semantic cache engine (usable without Ray): ``SemanticCache.check`` / ``store`` over a
swappable index, entry store, eviction policy, decision policy and persistence (snapshot files or
an incremental segment log)."""

from raycache.cache.engine import LookupResult, PendingLookup, SemanticCache, policy_from_config
from raycache.cache.eviction import LRUEviction
from raycache.cache.persist import PeriodicSnapshot, Snapshot, SnapshotError, quarantine
from raycache.cache.policy import CalibratedThreshold, StaticThreshold, clopper_pearson_upper
from raycache.cache.scope import Scope, history_hash, make_scope
from raycache.cache.segments import PeriodicFlush, SegmentLog
from raycache.cache.store import Entry, EntryStore

__all__ = [
    "CalibratedThreshold", "Entry", "EntryStore", "LRUEviction", "LookupResult", "PendingLookup",
    "PeriodicFlush", "PeriodicSnapshot", "Scope", "SegmentLog", "SemanticCache", "Snapshot",
    "SnapshotError", "StaticThreshold", "clopper_pearson_upper", "history_hash", "make_scope",
    "policy_from_config", "quarantine",
]
