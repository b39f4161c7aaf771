"""raycache.io (atomic writes, paths / URIs, filesystems, free_port), raycache.numeric, raycache.answers,
raycache.chat_api and splits.UnionFind: the shared helpers every caller uses."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from raycache import io as rio
from raycache.answers import answer_set, normalize_answer
from raycache.chat_api import chat_completions_url
from raycache.numeric import percentiles, unit_rows
from raycache.splits import UnionFind


def test_atomic_open_replaces_only_after_a_complete_write(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with rio.atomic_open(target, "w") as f:
        f.write("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with rio.atomic_open(target, "w") as f:
            f.write("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "first"
    assert sorted(os.listdir(target.parent)) == ["out.json"]  # no temporary left behind


def test_atomic_open_keep_mode(tmp_path):
    target = tmp_path / "t.txt"
    rio.write_text_atomic(target, "a")
    assert (os.stat(target).st_mode & 0o777) == 0o644
    os.chmod(target, 0o640)
    rio.write_text_atomic(target, "b")
    assert (os.stat(target).st_mode & 0o777) == 0o640 and target.read_text() == "b"


def test_atomic_path_for_writers_that_want_a_name(tmp_path):
    target = tmp_path / "m.npy"
    with rio.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".m.npy.") and tmp.name.endswith(".tmp")
        np.save(open(tmp, "wb"), np.arange(3))
        assert not target.exists()
    assert np.load(target).tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        with rio.atomic_path(target) as tmp:
            raise ValueError("no")
    assert sorted(os.listdir(tmp_path)) == ["m.npy"]


def test_fs_write_atomic_on_a_pyarrow_filesystem(tmp_path):
    fs = pafs.LocalFileSystem()
    final = f"{tmp_path}/shard.bin"
    assert rio.fs_write_atomic(fs, final, lambda s: s.write(b"abc")) == final
    assert open(final, "rb").read() == b"abc"

    def fail(stream):
        stream.write(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        rio.fs_write_atomic(fs, f"{tmp_path}/other.bin", fail)
    assert sorted(os.listdir(tmp_path)) == ["shard.bin"]


def test_paths_and_uris(tmp_path):
    assert rio.is_remote("s3://b/k") and not rio.is_remote("file:///x") and not rio.is_remote("rel/x")
    assert rio.local_file_path(f"file://{tmp_path}/a%20b.npz") == tmp_path / "a b.npz"
    assert rio.local_file_path("plain/x.npz") == Path("plain/x.npz")
    for bad, problem in [("s3://b/k", "only local"), ("file://host/x", "local file"), ("", "empty"),
                         ("a\x00b", "NUL")]:
        with pytest.raises(ValueError, match=problem):
            rio.local_file_path(bad, "what")
    fs, path = rio.filesystem("rel/x.jsonl")
    assert isinstance(fs, pafs.LocalFileSystem) and path == os.path.abspath("rel/x.jsonl")
    fs, path = rio.filesystem(f"file://{tmp_path}/a%20b")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/a b"


def test_free_port_is_bindable():
    port = rio.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_unit_rows_and_percentiles():
    x = unit_rows(np.array([[3.0, 4.0], [0.0, 2.0]]))
    assert x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    for bad in ([[0.0, 0.0]], [[np.nan, 1.0]]):
        with pytest.raises(KeyError, match="rows must be finite and non-zero"):
            unit_rows(np.array(bad), KeyError, "rows")
    assert percentiles(range(1, 101)) == {"p50": 50.5, "p95": 95.05, "p99": 99.01}
    assert list(percentiles([1.0, 2.0], (50, 99))) == ["p50", "p99"]


def test_one_answer_normaliser():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert answer_set(["The Pacific", "pacific ocean", "", "the", 3]) == {"pacific", "pacific ocean"}
    assert answer_set("An Apple") == {"apple"} and answer_set(None) == set() == answer_set(float("nan"))


def test_one_chat_completions_url():
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("https://h/v1/chat/completions") == "https://h/v1/chat/completions"
    with pytest.raises(ValueError, match="http"):
        chat_completions_url("h:8000")


def test_union_find():
    sets = UnionFind()
    sets.union("a", "b")
    sets.union("c", "d")
    sets.union("b", "d")
    assert len({sets.find(x) for x in "abcd"}) == 1 and sets.find("e") == "e"
    assert list(sets) == ["a", "b", "c", "d", "e"]
