"""Local I/O plumbing in one place: atomic writes, local-path / URI parsing, pyarrow filesystem
resolution, a free TCP port.

* :func:`atomic_open` / :func:`atomic_path` / :func:`write_text_atomic`: write a local file through a
  hidden temporary file in the same folder (``.<name>.<random>.tmp``), ``fsync`` it, then
  ``os.replace`` it over the target, so a reader or a crash sees the old file or the new one, never a
  torn one. :func:`fs_write_atomic` does the same on any pyarrow filesystem (write, then move).
* :func:`is_remote`, :func:`local_file_path`: what a path string names (a local path, a ``file://`` URI,
  or another filesystem's URI such as ``s3://bucket/key``).
* :func:`filesystem`: the pyarrow filesystem and the path within it for a local path or URI.
* :func:`free_port`: a TCP port that is free right now (for a local service or Ray head).

Only the standard library is imported at module level; pyarrow is imported when a filesystem is asked for.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.fs as pafs

__all__ = ["atomic_open", "atomic_path", "filesystem", "free_port", "fs_write_atomic", "fsync_dir",
           "is_remote", "local_file_path", "strict_json", "write_json_atomic", "write_text_atomic"]

FILE_SCHEME = "file://"


# --------------------------------------------------------------------------- paths and URIs


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URI of a filesystem other than the local one (``s3://…``, ``gs://…``); False for a
    plain path or a ``file://`` URI."""
    text = os.fsdecode(os.fspath(path))
    return "://" in text and not text.startswith(FILE_SCHEME)


def local_file_path(path: str | os.PathLike, what: str = "path") -> Path:
    """``path`` (a plain path or a ``file://`` URI, percent-decoded) as a local Path. ValueError naming
    ``what`` for an empty path, a NUL byte, another URI scheme or a file:// URI with a remote host."""
    text = os.fsdecode(os.fspath(path))
    if text.startswith(FILE_SCHEME):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{what} {text!r}: a file:// URI must name a local file (file:///path)")
        text = unquote(parts.path)
    elif "://" in text:
        raise ValueError(f"{what} {text!r}: only local paths and file:// URIs are supported")
    if "\x00" in text:
        raise ValueError(f"{what} {text!r} holds a NUL byte")
    if not text:
        raise ValueError(f"{what} is empty")
    return Path(text)


def filesystem(path: str) -> tuple["pafs.FileSystem", str]:
    """``(filesystem, path within it)`` for a local path (made absolute) or any URI that
    :func:`pyarrow.fs.FileSystem.from_uri` understands (``file:///…``, ``s3://…``, ``gs://…``).
    A bad URI raises pyarrow's error (``pa.ArrowException``, ValueError or OSError)."""
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


# --------------------------------------------------------------------------- atomic writes


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder so that a rename inside it is durable (a no-op where the platform refuses)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def _finish(tmp: str, path: Path, keep_mode: bool, sync_dir: bool) -> None:
    if keep_mode:  # the replaced file's permissions (or 0644 for a new one), not mkstemp's 0600
        try:
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, keep_mode: bool = False,
                sync_dir: bool = False, **open_kwargs: Any) -> Iterator[Any]:
    """A file (opened with ``mode``, ``"wb"`` or ``"w"``) that replaces ``path`` only once it has been
    fully written and fsynced. Parent folders are created; on any failure the temporary file is
    removed and ``path`` is untouched. ``keep_mode`` gives the new file the old one's permissions
    (0644 when there was none); ``sync_dir`` also fsyncs the folder after the rename."""
    path = Path(os.path.abspath(os.fspath(path)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _finish(tmp, path, keep_mode, sync_dir)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, keep_mode: bool = False,
                sync_dir: bool = False) -> Iterator[Path]:
    """A temporary path, next to ``path``, for a writer that wants a file name rather than a file
    object (``np.lib.format.open_memmap``, a library's ``save``); once the block ends without an
    error the file is fsynced and moved over ``path``. Same guarantees as :func:`atomic_open`."""
    path = Path(os.path.abspath(os.fspath(path)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _finish(tmp, path, keep_mode, sync_dir)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, *, keep_mode: bool = True,
                      encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`); returns the path."""
    with atomic_open(path, "w", keep_mode=keep_mode, encoding=encoding) as f:
        f.write(text)
    return Path(path)


def strict_json(value: Any) -> Any:
    """NaN/inf -> None (strict JSON has neither), recursively; numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as strict JSON (:func:`strict_json`, indented) atomically, so readers never see a
    half-written file."""
    with atomic_open(path, "w") as f:
        json.dump(strict_json(obj), f, indent=2, default=str, allow_nan=False)


def fs_write_atomic(fs: "pafs.FileSystem", final: str, write: Callable[[Any], None]) -> str:
    """On a pyarrow filesystem: ``write(stream)`` into a hidden temporary file next to ``final``
    (``.<name>.<8 hex>.tmp``), then move it into place; the temporary is deleted on failure.
    Returns ``final``."""
    folder, _, name = final.rpartition("/")
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with fs.open_output_stream(tmp) as stream:
            write(stream)
        fs.move(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise
    return final


# --------------------------------------------------------------------------- ports


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
