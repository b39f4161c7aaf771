"""Cache snapshots on disk: one ``.npz`` file (numpy arrays + a JSON document), never pickle.

Writes are atomic: the snapshot goes to a temporary file in the same folder, is fsynced, then
``os.replace``d over the old one, so a crash leaves either the old or the new file, never a torn one.
:class:`PeriodicSnapshot` saves every ``interval_s`` when the cache changed and once more on stop,
so a crash loses at most one period's inserts. A snapshot that cannot be read raises
:class:`SnapshotError`; :func:`quarantine` moves it aside so it is never silently overwritten.
Incremental persistence (a log of segments on any filesystem) is :mod:`raycache.cache.segments`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from raycache import io as _io

logger = logging.getLogger(__name__)

FORMAT = "raycache-snapshot"
VERSION = 1
_ARRAYS = ("ids", "vectors", "created_at", "last_access", "expires_at")
_TEXTS = ("prompts", "responses", "namespaces", "history_hashes")


class SnapshotError(RuntimeError):
    """A snapshot file is unreadable or does not match this cache; the message names the file."""


@dataclass
class Snapshot:
    """Cache contents, entries in least-recently-used-first order.

    ``ids`` int64 [n]; ``vectors`` float32 [n, dim]; ``created_at``/``last_access``/``expires_at``
    float64 [n] seconds on the cache clock (``expires_at`` NaN = never); the four text lists have n
    items; ``meta``: dim, next_id, model, saved_at and free-form fields.
    """

    ids: np.ndarray
    vectors: np.ndarray
    created_at: np.ndarray
    last_access: np.ndarray
    expires_at: np.ndarray
    prompts: list[str]
    responses: list[str]
    namespaces: list[str]
    history_hashes: list[str]
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.ids)


def local_file_path(path: str | os.PathLike, what: str = "snapshot path") -> Path:
    """``path`` (a plain path or a ``file://`` URI) as a local Path (:func:`raycache.io.local_file_path`)."""
    return _io.local_file_path(path, what)


def write_snapshot(path: str | os.PathLike, snap: Snapshot) -> Path:
    """Write ``snap`` to ``path`` atomically (temp file + fsync + os.replace); returns the path."""
    path = local_file_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"format": FORMAT, "version": VERSION, "meta": snap.meta,
                **{name: getattr(snap, name) for name in _TEXTS}}
    payload = np.frombuffer(json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass"),
                            dtype=np.uint8)
    with _io.atomic_open(path, "wb", sync_dir=True) as f:
        np.savez(f, document=payload, **{name: getattr(snap, name) for name in _ARRAYS})
    return path


def json_header(raw: bytes, format_: str, version: int, bad: Callable[[str], Exception]) -> dict:
    """The JSON document ``raw`` of a persisted file, checked to carry ``format`` / ``version``;
    raises ``bad(problem)`` otherwise."""
    try:
        document = json.loads(raw.decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"unreadable JSON document: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != format_:
        raise bad("wrong format marker")
    if document.get("version") != version:
        raise bad(f"format version {document.get('version')!r}; this raycache reads version {version}")
    return document


def read_snapshot(path: str | os.PathLike) -> Snapshot:
    """Read and validate a snapshot. FileNotFoundError if absent; SnapshotError if unreadable."""
    path = local_file_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no cache snapshot at {path}")

    def bad(problem: str) -> SnapshotError:
        return SnapshotError(f"{path}: not a valid raycache snapshot ({problem})")

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in (*_ARRAYS, "document")}
    except KeyError as exc:
        raise bad(f"missing array {exc}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise bad(f"{type(exc).__name__}: {exc}") from None
    document = json_header(arrays.pop("document").tobytes(), FORMAT, VERSION, bad)
    meta = document.get("meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("dim"), int):
        raise bad("meta.dim missing")
    n = len(arrays["ids"])
    if arrays["vectors"].shape != (n, meta["dim"]) or arrays["vectors"].dtype != np.float32:
        raise bad(f"vectors have shape {arrays['vectors'].shape} {arrays['vectors'].dtype}, "
                  f"expected ({n}, {meta['dim']}) float32")
    for name in ("created_at", "last_access", "expires_at"):
        if arrays[name].shape != (n,):
            raise bad(f"{name} has shape {arrays[name].shape}, expected ({n},)")
    texts = {}
    for name in _TEXTS:
        value = document.get(name)
        if not isinstance(value, list) or len(value) != n or not all(isinstance(s, str) for s in value):
            raise bad(f"{name} must be a list of {n} strings")
        texts[name] = value
    return Snapshot(ids=arrays["ids"].astype(np.int64), vectors=arrays["vectors"],
                    created_at=arrays["created_at"].astype(np.float64),
                    last_access=arrays["last_access"].astype(np.float64),
                    expires_at=arrays["expires_at"].astype(np.float64), meta=meta, **texts)


def quarantine(path: str | os.PathLike, filesystem: Any = None) -> Path | str:
    """Move a bad snapshot aside to ``<path>.corrupt-<UTC time>`` (kept for inspection); returns
    the new path. ``path`` may be a file or a segment log folder, local or (a str) any pyarrow
    filesystem URI such as ``s3://…`` (then, or with ``filesystem``, the new path is a str)."""
    if filesystem is not None or _io.is_remote(path):
        return _quarantine_on(filesystem, os.fsdecode(os.fspath(path)))
    path = _io.local_file_path(path, "snapshot path")
    stem = f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    aside, n = path.with_name(stem), 1
    while aside.exists():
        aside, n = path.with_name(f"{stem}-{n}"), n + 1
    os.replace(path, aside)
    return aside


def _quarantine_on(fs: Any, uri: str) -> str:
    """:func:`quarantine` on a pyarrow filesystem (``fs`` None: the one ``uri`` names): a file is
    moved, a folder (prefix) moved file by file. Returns the new URI."""
    import pyarrow.fs as pafs

    fs, root = (fs, uri) if fs is not None else _io.filesystem(uri)
    root, uri = root.rstrip("/"), uri.rstrip("/")
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing to quarantine at {uri}")
    suffix = f".corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    stem, n = suffix, 1
    while fs.get_file_info(root + suffix).type != pafs.FileType.NotFound:
        suffix, n = f"{stem}-{n}", n + 1
    if info.type == pafs.FileType.Directory:
        fs.create_dir(root + suffix, recursive=True)
        for item in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            target = root + suffix + item.path[len(root):]
            if item.type == pafs.FileType.File:
                fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                fs.move(item.path, target)
        fs.delete_dir(root)
    else:
        fs.move(root, root + suffix)
    return uri + suffix


class PeriodicSaver:
    """The thread of a background saver: ``save(only_if_changed=True)`` every ``interval_s``
    seconds from :meth:`start` until :meth:`stop`, which saves once more. Subclasses define
    ``save`` (and may wait for their own workers in ``_join_workers``)."""

    thread_name = "raycache-saver"

    def __init__(self, interval_s: float):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.saves = 0
        self.last_saved_at: Optional[float] = None
        self.last_error: Optional[str] = None

    def save(self, only_if_changed: bool = False) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def start(self) -> "PeriodicSaver":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.save(only_if_changed=True)

    def _join_workers(self) -> None:
        """Wait for any other thread of the saver (after the periodic one stopped)."""

    def stop(self, final_save: bool = True) -> None:
        """Stop the thread; then save if anything changed (``final_save``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.interval_s))
            self._thread = None
        self._join_workers()
        if final_save:
            self.save(only_if_changed=True)


class PeriodicSnapshot(PeriodicSaver):
    """Background saver: every ``interval_s`` seconds, if ``version()`` changed since the last save,
    write ``snapshot()`` to ``path``; ``stop()`` saves once more.

    ``snapshot`` is called from the saver thread and must be thread-safe (the engine's is: it
    copies under its lock); the file write happens outside any cache lock.
    """

    thread_name = "raycache-snapshot"

    def __init__(self, path: str | os.PathLike, snapshot: Callable[[], Snapshot],
                 version: Callable[[], int], interval_s: float):
        super().__init__(interval_s)
        self.path = local_file_path(path)
        self._snapshot, self._version = snapshot, version
        self._saved_version: Optional[int] = version()
        self._save_lock = threading.Lock()

    def save(self, only_if_changed: bool = False) -> bool:
        """Write a snapshot now; returns whether one was written. Errors are logged, not raised."""
        with self._save_lock:
            version = self._version()
            if only_if_changed and version == self._saved_version:
                return False
            try:
                snap = self._snapshot()
                write_snapshot(self.path, snap)
            except Exception as exc:  # keep serving; the old file is intact
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.error("cache snapshot to %s failed: %s", self.path, self.last_error)
                return False
            self._saved_version = version
            self.saves += 1
            self.last_saved_at = time.time()
            self.last_error = None
            logger.info("cache snapshot: %d entries -> %s", len(snap), self.path)
            return True

    def status(self) -> dict:
        return {"path": str(self.path), "interval_s": self.interval_s, "saves": self.saves,
                "last_saved_at": self.last_saved_at, "last_error": self.last_error}
