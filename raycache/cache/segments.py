"""Incremental cache persistence: a log of Arrow IPC segments on any pyarrow filesystem (a local
folder, ``file://…``, ``s3://bucket/prefix``).

Layout of a log folder::

    base-000000000007.arrow   every entry as of change 7, least recently used first
    seg-000000000008.arrow    what changed after it: entries stored, entries used, ids removed
    seg-000000000009.arrow    ...

A segment holds one row per changed id (``op``: 0 removed, 1 used, 2 stored; a stored row carries
the vector, times and texts, a used row only its new ``last_access``), written in recency order, so
replaying ``base`` + segments in order gives the cache's entries, ids, TTLs, LRU order and last-use
times exactly as they were at the last flush. Every file is written to a hidden temporary name and
moved into place (a crash leaves a leftover ``.*.tmp``, never a torn segment); :meth:`SegmentLog.clean`
deletes leftovers and superseded files. Compaction folds the segments into a new base (read from the
files, outside any cache lock). One process writes a log at a time.

:class:`PeriodicFlush` is the background saver (the incremental twin of
:class:`raycache.cache.persist.PeriodicSnapshot`): every ``interval_s`` it takes the cache's changes
(O(changes) under the cache lock) and appends them as one segment (written outside the lock), so a
crash loses at most one interval; it compacts in a background thread once the segments grow large.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from raycache import io as _io
from raycache.cache.journal import Changes
from raycache.cache.persist import PeriodicSaver, Snapshot, SnapshotError, json_header, read_snapshot

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    import pyarrow.fs as pafs

    from raycache.cache.engine import SemanticCache

logger = logging.getLogger(__name__)

FORMAT = "raycache-segment"
VERSION = 1
REMOVED, USED, STORED = 0, 1, 2
_TEXTS = ("prompts", "responses", "namespaces", "history_hashes")
_TEXT_COLUMNS = ("prompt", "response", "namespace", "history_hash")
_NAME = re.compile(r"^(base|seg)-(\d{12})\.arrow$")
_META_KEY = b"raycache"
UPGRADING, UPGRADED = ".upgrading", ".snapshot-v1"  # a legacy snapshot file while / after it moved into a log


def _schema() -> "pa.Schema":
    import pyarrow as pa

    return pa.schema([("op", pa.int8()), ("id", pa.int64()), ("last_access", pa.float64()),
                      ("created_at", pa.float64()), ("expires_at", pa.float64()),
                      ("vector", pa.large_binary()),
                      *[(name, pa.large_string()) for name in _TEXT_COLUMNS]])


@dataclass
class _File:
    kind: str  # "base" | "seg"
    seq: int
    path: str  # within the filesystem
    size: int


@dataclass
class _Part:
    """One segment read back: its rows' op/id/last_access, and for its stored rows (in row order)
    created_at/expires_at, vectors [k, dim] and texts."""

    name: str
    meta: dict
    op: np.ndarray
    ids: np.ndarray
    last_access: np.ndarray
    created_at: np.ndarray
    expires_at: np.ndarray
    vectors: np.ndarray
    texts: dict[str, list]


def _vector_column(vectors: np.ndarray, stored: np.ndarray) -> "pa.Array":
    """large_binary [len(stored)]: row i holds vectors' next row (raw float32) where stored[i], else
    null (no bytes), built on the numpy buffer without copying it."""
    import pyarrow as pa

    n, k = len(stored), int(stored.sum())
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    width = vectors.shape[1] * 4 if vectors.ndim == 2 else 0
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.where(stored, width, 0), out=offsets[1:])
    validity = None if k == n else pa.array(stored).buffers()[1]
    return pa.Array.from_buffers(pa.large_binary(), n, [validity, pa.py_buffer(offsets),
                                                        pa.py_buffer(vectors.reshape(-1).view(np.uint8))],
                                 null_count=n - k)


def _table(meta: dict, op: np.ndarray, ids: np.ndarray, last_access: np.ndarray, snap: Snapshot) -> "pa.Table":
    """A segment table: rows (op, id, last_access); ``snap`` holds the stored rows' data in row order."""
    import pyarrow as pa

    n = len(op)
    stored = op == STORED
    created = np.full(n, np.nan)
    expires = np.full(n, np.nan)
    created[stored], expires[stored] = snap.created_at, snap.expires_at
    columns: dict[str, Any] = {"op": op.astype(np.int8), "id": ids.astype(np.int64),
                               "last_access": last_access.astype(np.float64), "created_at": created,
                               "expires_at": expires, "vector": _vector_column(snap.vectors, stored)}
    rows = None if stored.all() else np.flatnonzero(stored).tolist()
    for column, name in zip(_TEXT_COLUMNS, _TEXTS):
        values = getattr(snap, name)
        if rows is not None:  # nulls on the removed / used rows
            full: list = [None] * n
            for row, value in zip(rows, values):
                full[row] = value
            values = full
        columns[column] = pa.array(values, pa.large_string())
    schema = _schema().with_metadata({_META_KEY: json.dumps(meta, ensure_ascii=False)})
    return pa.Table.from_pydict(columns, schema=schema)


class SegmentLog:
    """The segment files under ``uri`` (a local folder or any pyarrow filesystem URI; ``filesystem``
    overrides the one the URI names, e.g. a pre-configured S3FileSystem)."""

    def __init__(self, uri: str | os.PathLike, filesystem: Optional["pafs.FileSystem"] = None):
        text = os.fsdecode(os.fspath(uri))
        if filesystem is not None:
            self.fs, self.root = filesystem, text.rstrip("/")
        elif _io.is_remote(text):
            self.fs, self.root = _io.filesystem(text)
            self.root = self.root.rstrip("/")
        else:
            import pyarrow.fs as pafs

            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(_io.local_file_path(text, "log path"))
        self.uri = text.rstrip("/") or text
        self.local = type(self.fs).__name__ == "LocalFileSystem"
        self.last_seq = -1  # highest sequence number seen or written
        self.base_bytes = 0
        self.delta_bytes = 0
        self.deltas = 0

    # ------------------------------------------------------------------ listing
    def name_of(self, path: str) -> str:
        """How a file is named in messages: the URI of the log + its file name."""
        return f"{self.uri}/{path.rsplit('/', 1)[-1]}"

    def kind(self) -> str:
        """'absent' | 'file' (e.g. a legacy snapshot where the log should be) | 'folder'."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.root)
        return {pafs.FileType.NotFound: "absent", pafs.FileType.Directory: "folder"}.get(info.type, "file")

    def _scan(self) -> tuple[list[_File], list[str]]:
        """(segment files sorted by seq, leftover temporary files)."""
        import pyarrow.fs as pafs

        if self.kind() != "folder":
            return [], []
        files, temps = [], []
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True)):
            if info.type != pafs.FileType.File:
                continue
            match = _NAME.match(info.base_name)
            if match:
                files.append(_File(match.group(1), int(match.group(2)), info.path, int(info.size or 0)))
            elif info.base_name.startswith(".") and info.base_name.endswith(".tmp"):
                temps.append(info.path)
        files.sort(key=lambda f: (f.seq, f.kind != "base"))  # base-N sorts before seg-N
        if files:
            self.last_seq = max(self.last_seq, files[-1].seq)
        return files, temps

    def _live(self, files: list[_File]) -> tuple[Optional[_File], list[_File]]:
        """The newest base and the segments after it (SnapshotError for a gap or no base)."""
        bases = [f for f in files if f.kind == "base"]
        base = bases[-1] if bases else None
        segs = [f for f in files if f.kind == "seg" and (base is None or f.seq > base.seq)]
        if segs and base is None:
            raise SnapshotError(f"{self.uri}: log segments {self.name_of(segs[0].path)}... have no base segment")
        for expected, seg in enumerate(segs, start=base.seq + 1 if base else 0):
            if seg.seq != expected:
                missing = self.name_of(f"{self.root}/seg-{expected:012d}.arrow")
                raise SnapshotError(f"{missing}: this log segment is missing (the log goes on with "
                                    f"{self.name_of(seg.path)})")
        self.base_bytes = base.size if base else 0
        self.delta_bytes, self.deltas = sum(s.size for s in segs), len(segs)
        return base, segs

    def exists(self) -> bool:
        return bool(self._scan()[0])

    def clean(self) -> list[str]:
        """Delete leftover temporary files and the files a newer base supersedes; returns their
        names. Call only while no other process writes this log (e.g. on start)."""
        files, temps = self._scan()
        bases = [f for f in files if f.kind == "base"]
        stale = [f.path for f in files if bases and f.seq <= bases[-1].seq and f is not bases[-1]]
        for path in temps + stale:
            try:
                self.fs.delete_file(path)
            except OSError as exc:  # another cleaner got there first, or no permission
                logger.warning("could not delete %s: %s", self.name_of(path), exc)
        return [self.name_of(p) for p in temps + stale]

    # ------------------------------------------------------------------ writing
    def _write(self, kind: str, seq: int, table: "pa.Table") -> str:
        import pyarrow as pa

        name = f"{kind}-{seq:012d}.arrow"
        path = f"{self.root}/{name}"

        def write(sink: Any) -> None:
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)

        if self.local:  # fsynced, then renamed, then the folder fsynced
            with _io.atomic_path(path, sync_dir=True) as tmp, pa.OSFile(str(tmp), "wb") as sink:
                write(sink)
        else:
            self.fs.create_dir(self.root, recursive=True)
            _io.fs_write_atomic(self.fs, path, write)
        self.last_seq = max(self.last_seq, seq)
        size = int(self.fs.get_file_info(path).size or 0)
        if kind == "base":
            self.base_bytes, self.delta_bytes, self.deltas = size, 0, 0
        else:
            self.delta_bytes, self.deltas = self.delta_bytes + size, self.deltas + 1
        return self.name_of(path)

    def write_base(self, snap: Snapshot, seq: Optional[int] = None) -> str:
        """Write ``snap`` (entries in LRU order) as the base at ``seq`` (default: a new, highest
        one), then delete the files it supersedes; returns its name."""
        if seq is None:
            self._scan()
            seq = self.last_seq + 1
        n = len(snap)
        name = self._write("base", seq, _table(_meta(snap.meta, "base", seq), np.full(n, STORED, np.int8),
                                              snap.ids, snap.last_access, snap))
        files, _ = self._scan()
        for f in files:
            if f.seq < seq or (f.seq == seq and f.kind == "seg"):
                self.fs.delete_file(f.path)
        self._live(self._scan()[0])
        return name

    def append(self, changes: Changes) -> str:
        """Write ``changes`` as the next segment (a full one as a new base); returns its name."""
        if changes.full:
            return self.write_base(changes.entries)
        if self.last_seq < 0:
            self._scan()
        seq = self.last_seq + 1
        r = len(changes.removed)
        op = np.concatenate([np.full(r, REMOVED, np.int8), np.where(changes.stored, STORED, USED).astype(np.int8)])
        ids = np.concatenate([changes.removed, changes.order]).astype(np.int64)
        last_access = np.concatenate([np.full(r, np.nan), changes.last_access])
        return self._write("seg", seq, _table(_meta(changes.entries.meta, "seg", seq), op, ids, last_access,
                                              changes.entries))

    # ------------------------------------------------------------------ reading
    def _read(self, f: _File) -> _Part:
        import pyarrow as pa

        name = self.name_of(f.path)

        def bad(problem: str) -> SnapshotError:
            return SnapshotError(f"{name}: not a valid raycache snapshot segment ({problem})")

        try:
            source = pa.memory_map(f.path) if self.local else self.fs.open_input_file(f.path)
            table = pa.ipc.open_file(source).read_all()
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise bad(f"{type(exc).__name__}: {exc}") from None
        if not table.schema.remove_metadata().equals(_schema()):
            raise bad(f"columns {table.schema.remove_metadata().names} of the wrong names or types")
        meta = json_header((table.schema.metadata or {}).get(_META_KEY, b""), FORMAT, VERSION, bad)
        if meta.get("kind") != f.kind or meta.get("seq") != f.seq:
            raise bad(f"it says it is {meta.get('kind')!r} {meta.get('seq')!r}")
        dim = meta.get("dim")
        if not isinstance(dim, int) or dim < 1 or not isinstance(meta.get("next_id"), int):
            raise bad("meta.dim / meta.next_id missing")
        if table.column("id").null_count or table.column("op").null_count:
            raise bad("null ids or ops")
        op = table.column("op").to_numpy()
        stored = op == STORED
        if not np.isin(op, (REMOVED, USED, STORED)).all() or (f.kind == "base" and not stored.all()):
            raise bad("unknown row ops")
        vector = table.column("vector").combine_chunks()
        valid = vector.is_valid().to_numpy(zero_copy_only=False)
        buffers = vector.buffers()
        offsets = (np.frombuffer(buffers[1], np.int64, len(vector) + 1, vector.offset * 8)
                   if buffers[1] is not None else np.zeros(len(vector) + 1, np.int64))
        if not np.array_equal(valid, stored) or not np.array_equal(np.diff(offsets), np.where(stored, 4 * dim, 0)):
            raise bad(f"stored rows need one {dim}-float vector each, other rows none")
        k = int(stored.sum())
        vectors = (np.frombuffer(buffers[2], np.float32, k * dim, int(offsets[0])).reshape(k, dim)
                   if k else np.zeros((0, dim), np.float32))
        texts = {}
        mask = None if stored.all() else pa.array(stored)
        for column, name_ in zip(_TEXT_COLUMNS, _TEXTS):
            values = table.column(column) if mask is None else table.column(column).filter(mask)
            if values.null_count:
                raise bad(f"stored rows without a {column}")
            texts[name_] = values.to_pylist()
        last_access = table.column("last_access").to_numpy()
        if np.isnan(last_access[~(op == REMOVED)]).any():
            raise bad("used or stored rows without last_access")
        return _Part(name, meta, op, table.column("id").to_numpy(), last_access,
                     table.column("created_at").to_numpy()[stored], table.column("expires_at").to_numpy()[stored],
                     vectors, texts)

    def read(self) -> Snapshot:
        """The cache the log holds: base + segments replayed, entries least recently used first.
        FileNotFoundError when there is no log; SnapshotError naming the file that is bad."""
        files, _ = self._scan()
        base, segs = self._live(files)
        if base is None:
            raise FileNotFoundError(f"no cache log at {self.uri}")
        return _replay(self.uri, [self._read(f) for f in [base, *segs]])

    def compact(self) -> Optional[str]:
        """Fold the segments into a new base (read from the files; no cache lock); returns its name,
        None when there was nothing to fold."""
        base, segs = self._live(self._scan()[0])
        if base is None or not segs:
            return None
        snap = _replay(self.uri, [self._read(f) for f in [base, *segs]])
        return self.write_base(snap, seq=segs[-1].seq)

    def status(self) -> dict:
        return {"segments": self.deltas, "base_bytes": self.base_bytes, "segment_bytes": self.delta_bytes}


def _meta(meta: dict, kind: str, seq: int) -> dict:
    return {**_io.strict_json(meta), "format": FORMAT, "version": VERSION, "kind": kind, "seq": seq}


def _replay(uri: str, parts: list[_Part]) -> Snapshot:
    """Apply base + segments: the pool of every stored row; each row's last appearance (stored or
    used) sets its recency and last_access; removed ids die. O(rows · log rows), no per-entry Python."""
    dims = {p.meta["dim"] for p in parts}
    models = {p.meta.get("model") for p in parts}
    if len(dims) > 1 or len(models) > 1:
        raise SnapshotError(f"{uri}: segments disagree on dim {sorted(dims)} / model {sorted(map(str, models))}")
    dim = dims.pop()
    starts = np.cumsum([0] + [len(p.vectors) for p in parts])
    pool_ids = np.concatenate([p.ids[p.op == STORED] for p in parts])
    sorter = np.argsort(pool_ids, kind="stable")
    ordered = pool_ids[sorter]
    twice = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(twice):
        raise SnapshotError(f"{uri}: entry id {int(ordered[twice[0]])} is stored twice")

    def rows_of(ids: np.ndarray, part: _Part, strict: bool) -> np.ndarray:
        at = np.minimum(np.searchsorted(ordered, ids), max(len(ordered) - 1, 0))
        found = ordered[at] == ids if len(ordered) else np.zeros(len(ids), bool)
        if strict and not found.all():
            raise SnapshotError(f"{part.name}: uses entry id {int(ids[~found][0])}, which no segment stored")
        return sorter[at[found]]

    total = int(starts[-1])
    recency = np.zeros(total, np.int64)
    last_access = np.zeros(total)
    dead = np.zeros(total, bool)
    clock = 0
    for i, part in enumerate(parts):
        dead[rows_of(part.ids[part.op == REMOVED], part, strict=False)] = True
        live = part.op != REMOVED
        op = part.op[live]
        rows = np.empty(len(op), np.int64)
        rows[op == STORED] = np.arange(starts[i], starts[i + 1])
        rows[op == USED] = rows_of(part.ids[live][op == USED], part, strict=True)
        recency[rows] = clock + np.arange(len(rows))
        last_access[rows] = part.last_access[live]
        clock += len(rows)
    final = np.flatnonzero(~dead)
    final = final[np.argsort(recency[final], kind="stable")]
    owner = np.searchsorted(starts, final, side="right") - 1
    created, expires = np.concatenate([p.created_at for p in parts]), np.concatenate([p.expires_at for p in parts])
    if len(final) == len(parts[0].vectors) and np.array_equal(final, np.arange(len(final))):
        vectors = parts[0].vectors  # the base alone, unchanged: no copy (a memory map, locally)
    else:
        vectors = np.empty((len(final), dim), np.float32)
        for i, part in enumerate(parts):
            mine = np.flatnonzero(owner == i)
            if len(mine):
                vectors[mine] = np.take(part.vectors, final[mine] - starts[i], axis=0)
    texts = {}
    picks = final.tolist()
    for name in _TEXTS:
        pool: list = []
        for part in parts:
            pool.extend(part.texts[name])
        texts[name] = [pool[r] for r in picks]
    last = parts[-1].meta
    meta = {k: v for k, v in last.items() if k not in ("format", "version", "kind", "seq")}
    meta["next_id"] = max(p.meta["next_id"] for p in parts)
    return Snapshot(ids=pool_ids[final], vectors=vectors, created_at=created[final],
                    last_access=last_access[final], expires_at=expires[final], meta=meta, **texts)


def read_persisted(path: str | os.PathLike) -> Snapshot:
    """A local snapshot file or segment log folder, read (FileNotFoundError / SnapshotError)."""
    local = _io.local_file_path(path, "snapshot path")
    return SegmentLog(local).read() if local.is_dir() else read_snapshot(local)


class PeriodicFlush(PeriodicSaver):
    """Background incremental saver of ``cache`` to the segment log at ``path`` (local folder or
    any pyarrow URI): :meth:`restore` once on start, then :meth:`start`; every ``interval_s``
    seconds the changes since the last flush go to one new segment; :meth:`stop` flushes once more.

    Compaction (a new base from the files, in a background thread) starts once there are
    ``compact_segments`` segments or their bytes exceed ``compact_ratio`` × the base's. Until a
    restore from this log succeeded, the first flush writes the whole cache as a new base.
    Same methods as :class:`raycache.cache.persist.PeriodicSnapshot` (``save``, ``stop``,
    ``status``), plus :meth:`restore` and :meth:`compact`.
    """

    thread_name = "raycache-flush"

    def __init__(self, path: str | os.PathLike, cache: "SemanticCache", interval_s: float, *,
                 compact_ratio: float = 0.5, compact_segments: int = 64,
                 filesystem: Optional["pafs.FileSystem"] = None):
        super().__init__(interval_s)
        if not compact_ratio > 0 or compact_segments < 1:
            raise ValueError(f"compact_ratio must be > 0 and compact_segments >= 1, got "
                             f"{compact_ratio}, {compact_segments}")
        self.log = SegmentLog(path, filesystem)
        self.path = self.log.uri
        self.cache = cache
        self.compact_ratio, self.compact_segments = compact_ratio, compact_segments
        cache.start_journal()
        self._rebase = True  # the log does not hold this cache yet
        self._pending: list[Changes] = []  # taken but not yet written (a failed write), oldest first
        self._flush_lock = threading.Lock()
        self._compact_lock = threading.Lock()
        self._compactor: Optional[threading.Thread] = None
        self.compactions = 0
        self.last_compacted_at: Optional[float] = None
        self.cleaned: list[str] = []

    # ------------------------------------------------------------------ start
    def restore(self) -> int:
        """Delete leftovers, then load the log into the cache; returns the entries kept.
        A legacy snapshot file at a local ``path`` is read and turned into the log's base (the file
        is kept as ``<path>.snapshot-v1``). FileNotFoundError when there is nothing to restore;
        SnapshotError (naming the bad file) when it cannot be read."""
        kind = self.log.kind()
        if kind != "file":
            self.cleaned = self.log.clean()
            if self.cleaned:
                logger.info("cache log %s: deleted leftovers %s", self.path, self.cleaned)
        if kind == "folder" and self.log.exists():
            n = self.cache.restore_snapshot(self.log.read(), in_log=True)
            self._rebase = False
            return n
        if self.log.local:
            legacy = Path(self.log.root)
            upgrading = legacy.with_name(legacy.name + UPGRADING)
            if kind == "file":
                snap = read_snapshot(legacy)  # SnapshotError here leaves the file where it was
                os.replace(legacy, upgrading)
            elif upgrading.is_file():  # a crash while upgrading last time
                snap = read_snapshot(upgrading)
            else:
                raise FileNotFoundError(f"no cache log or snapshot at {self.path}")
            n = self.cache.restore_snapshot(snap)
            if not self.save():
                raise OSError(f"could not write the cache log at {self.path}: {self.last_error}")
            os.replace(upgrading, legacy.with_name(legacy.name + UPGRADED))
            logger.info("cache snapshot %s upgraded to a segment log (old file kept as %s%s)",
                        legacy, legacy.name, UPGRADED)
            return n
        if kind == "file":
            raise SnapshotError(f"{self.path}: not a cache log folder")
        raise FileNotFoundError(f"no cache log at {self.path}")

    # ------------------------------------------------------------------ flush / compact
    def save(self, only_if_changed: bool = False) -> bool:
        """Flush the changes since the last flush now; returns whether the log is now up to date
        (False when ``only_if_changed`` and nothing changed, or on an error, which is logged, not
        raised: the changes stay pending for the next flush)."""
        with self._flush_lock:
            try:
                changes = self.cache.take_changes(full=self._rebase)
            except Exception as exc:
                return self._failed("taking the changes", exc)
            if not changes.empty:
                self._pending.append(changes)
            if not self._pending:
                return not only_if_changed
            rebase = any(c.full for c in self._pending)
            try:
                if rebase:
                    self._compact_lock.acquire()  # no compaction may read files a new base deletes
                try:
                    while self._pending:
                        name = self.log.append(self._pending[0])
                        self._pending.pop(0)
                        logger.debug("cache log: wrote %s", name)
                finally:
                    if rebase:
                        self._compact_lock.release()
            except Exception as exc:
                return self._failed(f"writing to {self.path}", exc)
            self._rebase = False
            self.saves += 1
            self.last_saved_at = time.time()
            self.last_error = None
        if self._compaction_due():
            self._compact_in_background()
        return True

    def _failed(self, what: str, exc: Exception) -> bool:
        self.last_error = f"{type(exc).__name__}: {exc}"
        logger.error("cache flush failed %s: %s", what, self.last_error)
        return False

    def _compaction_due(self) -> bool:
        log = self.log
        return log.deltas >= self.compact_segments or (
            log.deltas > 0 and log.delta_bytes > self.compact_ratio * max(log.base_bytes, 1 << 20))

    def _compact_in_background(self) -> None:
        if self._compactor is None or not self._compactor.is_alive():
            self._compactor = threading.Thread(target=self.compact, name="raycache-compact", daemon=True)
            self._compactor.start()

    def compact(self) -> bool:
        """Fold the segments into a new base now (outside the cache lock); returns whether one was
        written. Errors are logged, not raised (the segments stay valid)."""
        with self._compact_lock:
            try:
                name = self.log.compact()
            except Exception as exc:
                return self._failed(f"compacting {self.path}", exc)
            if name is None:
                return False
            self.compactions += 1
            self.last_compacted_at = time.time()
            logger.info("cache log compacted into %s", name)
            return True

    def _join_workers(self) -> None:
        if self._compactor is not None:  # a compaction under way finishes (its files stay valid)
            self._compactor.join()
            self._compactor = None

    def status(self) -> dict:
        return {"path": self.path, "format": "segment-log", "interval_s": self.interval_s,
                "saves": self.saves, "last_saved_at": self.last_saved_at, "last_error": self.last_error,
                "pending": len(self._pending), "compactions": self.compactions,
                "last_compacted_at": self.last_compacted_at, **self.log.status()}
