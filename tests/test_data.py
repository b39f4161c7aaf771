"""Tests for raycache.data: readers, validation, adapters, writers, pair ids, Ray Data."""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raycache.data import (
    KINDS,
    DataError,
    normalize_text,
    pair_id,
    parse_columns,
    read_dataset,
    read_pairs,
    read_prompts,
    read_stream,
    read_table,
    validate_frame,
    write_table,
)


def jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Write ``rows`` as JSON lines; ``raw_lines`` puts literal text at 1-based lines."""
    lines = [json.dumps(r) for r in rows]
    for lineno, text in sorted((raw_lines or {}).items()):
        lines.insert(lineno - 1, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kw)
    return str(info.value)


# --------------------------------------------------------------------------- schema, helpers


def test_kinds_schema():
    assert set(KINDS) == {"prompts", "pairs", "stream"}
    assert KINDS["prompts"].required == ("prompt",)
    assert set(KINDS["prompts"].optional) == {"answers", "group"}
    assert KINDS["pairs"].required == ("prompt_a", "prompt_b")
    assert set(KINDS["pairs"].optional) == {
        "label", "group_a", "group_b", "answers_a", "answers_b", "pair_id"}
    assert KINDS["stream"].required == ("prompt",)
    assert set(KINDS["stream"].optional) == {"group", "answers", "response", "namespace"}
    assert issubclass(DataError, ValueError)


def test_unknown_kind(tmp_path):
    p = jsonl(tmp_path / "x.jsonl", [{"prompt": "a"}])
    assert "unknown kind 'prompt'" in error_of(read_table, p, "prompt")


def test_normalize_text():
    assert normalize_text("  Hello\t\n  WORLD  ") == "hello world"
    assert normalize_text("ﬁne Ｆｕｌｌ") == "fine full"  # NFKC ligature / full width
    assert normalize_text("a\u00a0b\u3000c") == "a b c"  # unicode spaces collapse
    assert normalize_text("") == ""
    with pytest.raises(TypeError):
        normalize_text(None)


def test_pair_id_symmetric_and_stable():
    a, b = "How do I reset my password?", "password reset how"
    pid = pair_id(a, b)
    assert pid == pair_id(b, a)
    assert len(pid) == 16 and all(c in "0123456789abcdef" for c in pid)
    # Normalisation: case and whitespace do not matter; content does.
    assert pid == pair_id("  how do i RESET my   password?", "Password Reset How")
    assert pid != pair_id(a, b + "!")
    assert pair_id("a b", "c") != pair_id("a", "b c")
    # Stable across runs and machines (a fixed value, not Python's hash()).
    assert pair_id("hello", "world") == "7db827c10afc1719"


# --------------------------------------------------------------------------- column specs


def test_parse_columns():
    assert parse_columns("prompt_a=text_a,prompt_b=text_b") == {
        "prompt_a": "text_a", "prompt_b": "text_b"}
    assert parse_columns(" prompt = text , ") == {"prompt": "text"}
    assert parse_columns(None) == {}
    assert parse_columns("") == {}
    assert parse_columns({"prompt": "q"}) == {"prompt": "q"}


@pytest.mark.parametrize("spec, problem", [
    ("prompt", "should look like ours=theirs"),
    ("prompt=a=b", "should look like ours=theirs"),
    ("=text", "empty column name"),
    ("prompt=", "empty column name"),
    ("prompt=a,prompt=b", "'prompt' is mapped twice"),
    ("prompt_a=t,prompt_b=t", "input column 't' is used for both"),
    (123, "expected a string"),
    ({"prompt": 5}, "names must be strings"),
])
def test_parse_columns_errors(spec, problem):
    assert problem in error_of(parse_columns, spec)


def test_bad_column_spec_in_reader(tmp_path):
    p = jsonl(tmp_path / "x.jsonl", [{"text": "a"}])
    assert "bad column mapping" in error_of(read_prompts, p, columns="prompt:text")


# --------------------------------------------------------------------------- error paths


def test_missing_column_suggests_mapping(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("text,id\nhello,1\n")
    msg = error_of(read_prompts, p)
    assert msg == (f"{p}: missing required column 'prompt' (found: text, id); "
                   "use --columns prompt=text")


def test_missing_pair_columns(tmp_path):
    p = jsonl(tmp_path / "pairs.jsonl", [{"first": "a", "second": "b", "label": 1}])
    msg = error_of(read_pairs, p)
    assert "missing required columns 'prompt_a', 'prompt_b'" in msg
    assert "(found: first, second, label)" in msg
    assert "--columns prompt_a=first,prompt_b=second" in msg


def test_mapping_to_absent_column(tmp_path):
    p = jsonl(tmp_path / "x.jsonl", [{"text": "a"}])
    msg = error_of(read_prompts, p, columns="prompt=body")
    assert "maps 'prompt' to column 'body'" in msg and "found: text" in msg


def test_empty_prompt_names_file_and_row(tmp_path):
    rows = [{"prompt_a": f"q{i}", "prompt_b": f"r{i}"} for i in range(20)]
    rows[16]["prompt_a"] = "   "
    p = jsonl(tmp_path / "pairs.jsonl", rows)
    assert error_of(read_pairs, p) == f"{p}: row 17: column 'prompt_a' is empty"


@pytest.mark.parametrize("value, problem", [
    (123, "column 'prompt' must be a string, got int 123"),
    (["a"], "column 'prompt' must be a string, got list"),
    ({"a": 1}, "column 'prompt' must be a string, got object"),
    (True, "column 'prompt' must be a string, got bool"),
    (None, "column 'prompt' is missing or null"),
    ("", "column 'prompt' is empty"),
])
def test_prompt_wrong_type(tmp_path, value, problem):
    p = jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": value}])
    assert error_of(read_prompts, p).startswith(f"{p}: row 2: {problem}")


def test_missing_key_in_jsonl_row(tmp_path):
    p = jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"other": 1}])
    assert error_of(read_prompts, p) == f"{p}: row 2: column 'prompt' is missing or null"


@pytest.mark.parametrize("column, value, problem", [
    ("answers", 5, "column 'answers' must be a string or a list of strings, got int"),
    ("answers", ["a", 2], "column 'answers' must be a list of strings, got an element of type int"),
    ("group", [1], "column 'group' must be a string, got list"),
    ("group", 1.5, "column 'group' must be a string, got float"),
])
def test_optional_wrong_type(tmp_path, column, value, problem):
    p = jsonl(tmp_path / "p.jsonl", [{"prompt": "ok", column: value}])
    assert problem in error_of(read_prompts, p)


def test_broken_jsonl_line_number(tmp_path):
    p = jsonl(tmp_path / "x.jsonl", [{"prompt": "a"}, {"prompt": "b"}],
              raw_lines={2: "", 4: '{"prompt": "c",}'})
    msg = error_of(read_prompts, p)
    assert msg.startswith(f"{p}: line 4: invalid JSON: ")
    assert "Expecting property name" in msg


@pytest.mark.parametrize("line, problem", [
    ("[1, 2]", "expected a JSON object, got array"),
    ('"just a string"', "expected a JSON object, got string"),
    ("42", "expected a JSON object, got number"),
    ('{"prompt": "a"} {"prompt": "b"}', "invalid JSON: Extra data"),
    ('{"prompt": "\\ud800"}', "unpaired surrogate"),
])
def test_jsonl_line_problems(tmp_path, line, problem):
    p = jsonl(tmp_path / "x.jsonl", [{"prompt": "a"}], raw_lines={2: line})
    msg = error_of(read_prompts, p)
    assert msg.startswith(f"{p}: line 2: ") and problem in msg


def test_invalid_utf8_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff\xfe"}\n')
    assert error_of(read_prompts, p).startswith(f"{p}: line 2: not valid UTF-8")


@pytest.mark.parametrize("label, problem", [
    (1.5, "column 'label' must be in [0, 1], got 1.5"),
    (-1, "column 'label' must be in [0, 1], got -1"),
    (2, "column 'label' must be in [0, 1], got 2"),
    ("abc", "column 'label' must be a number in [0, 1], got 'abc'"),
    ([1], "column 'label' must be a number in [0, 1], got list"),
    (1e400, "column 'label' must be in [0, 1], got inf"),
])
def test_bad_label(tmp_path, label, problem):
    rows = [{"prompt_a": "a", "prompt_b": "b", "label": 0}, {"prompt_a": "a", "prompt_b": "c"}]
    rows[1]["label"] = label
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    assert error_of(read_pairs, p).startswith(f"{p}: row 2: {problem}")


def test_label_coercion(tmp_path):
    rows = [{"prompt_a": "a", "prompt_b": "b", "label": v}
            for v in [True, False, 0, 1, 0.25, None, "0.5", "", "true"]]
    rows.append({"prompt_a": "a", "prompt_b": "b"})  # no label key at all
    df = read_pairs(jsonl(tmp_path / "p.jsonl", rows))
    assert df["label"].dtype == np.float64
    got = df["label"].tolist()
    assert got[:5] == [1.0, 0.0, 0.0, 1.0, 0.25]
    assert math.isnan(got[5]) and got[6] == 0.5 and math.isnan(got[7]) and got[8] == 1.0
    assert math.isnan(got[9])


@pytest.mark.parametrize("name, content", [
    ("x.jsonl", ""),
    ("x.jsonl", "\n\n   \n"),
    ("x.csv", ""),
    ("x.csv", "prompt,group\n"),
    ("x.tsv", "prompt\tgroup\n"),
    ("x.json", "[]"),
    ("x.json", "  "),
])
def test_empty_file(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    assert error_of(read_prompts, p) == f"{p}: no rows"


def test_empty_parquet(tmp_path):
    p = tmp_path / "x.parquet"
    pd.DataFrame({"prompt": pd.Series([], dtype=object)}).to_parquet(p)
    assert error_of(read_prompts, p) == f"{p}: no rows"


def test_path_and_format_errors(tmp_path):
    assert "no such file or directory" in error_of(read_prompts, tmp_path / "nope.jsonl")
    p = tmp_path / "x.txt"
    p.write_text('{"prompt": "a"}\n')
    assert "cannot tell the format" in error_of(read_prompts, p)
    assert read_prompts(p, fmt="jsonl")["prompt"].tolist() == ["a"]
    assert "unknown format 'xml'" in error_of(read_prompts, p, fmt="xml")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    assert error_of(read_prompts, bad).startswith(f"{bad}: cannot read parquet")
    d = tmp_path / "emptydir"
    d.mkdir()
    (d / "notes.txt").write_text("hi")
    assert "directory has no" in error_of(read_prompts, d)


def test_json_array_errors(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('[{"prompt": "a"},\n {"prompt": }]')
    assert error_of(read_prompts, p).startswith(f"{p}: invalid JSON: Expecting value (line 2")
    p.write_text('[{"prompt": "a"}, 3]')
    assert error_of(read_prompts, p) == f"{p}: row 2: expected a JSON object, got number"
    p.write_text('"text"')
    assert "expected a JSON array of objects, got string" in error_of(read_prompts, p)
    # A .json file that really holds JSON lines is read as such.
    p.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert read_prompts(p)["prompt"].tolist() == ["a", "b"]


def test_malformed_csv(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text('prompt,group\na,1\nb,2,3,4\n')
    msg = error_of(read_prompts, p)
    assert msg.startswith(f"{p}: malformed CSV") and "line 3" in msg
    df = read_prompts(p, skip_invalid=True)
    assert df["prompt"].tolist() == ["a"] and df.attrs["skipped"] == 1


# --------------------------------------------------------------------------- skip_invalid


def test_skip_invalid_counts(tmp_path, caplog):
    p = jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt_a": "a", "prompt_b": "b", "label": 1},
            {"prompt_a": "", "prompt_b": "b"},
            {"prompt_a": "c", "prompt_b": "d", "label": 7},
            {"prompt_a": "e", "prompt_b": "f", "label": 0},
            {"prompt_a": 5, "prompt_b": "f"},
            {"prompt_a": "g", "prompt_b": "h"},
        ],
        raw_lines={3: "{oops"},
    )
    with caplog.at_level(logging.WARNING, logger="raycache.data"):
        df = read_pairs(p, skip_invalid=True)
    assert df["prompt_a"].tolist() == ["a", "e", "g"]
    assert df.index.tolist() == [0, 1, 2]
    assert df.attrs["skipped"] == 4
    ex = df.attrs["skipped_examples"]
    assert ex[0].startswith(f"{p}: line 3: invalid JSON")
    assert ex[1:] == [
        f"{p}: row 2: column 'prompt_a' is empty",
        f"{p}: row 4: column 'label' must be in [0, 1], got 7",
        f"{p}: row 6: column 'prompt_a' must be a string, got int 5",
    ]
    assert any("skipped 4 invalid row(s)" in r.getMessage() for r in caplog.records)


def test_skip_invalid_examples_capped_and_clean_file(tmp_path):
    rows = [{"prompt": ""} for _ in range(10)] + [{"prompt": "ok"}]
    df = read_prompts(jsonl(tmp_path / "x.jsonl", rows), skip_invalid=True)
    assert df.attrs["skipped"] == 10 and len(df.attrs["skipped_examples"]) == 5
    clean = read_prompts(jsonl(tmp_path / "y.jsonl", [{"prompt": "ok"}]), skip_invalid=True)
    assert clean.attrs["skipped"] == 0 and clean.attrs["skipped_examples"] == []


def test_skip_invalid_all_rows_bad(tmp_path):
    p = jsonl(tmp_path / "x.jsonl", [{"prompt": " "}, {"prompt": None}])
    msg = error_of(read_prompts, p, skip_invalid=True)
    assert "no valid rows; all 2 were invalid" in msg


def test_skip_invalid_does_not_hide_missing_column(tmp_path):
    p = jsonl(tmp_path / "x.jsonl", [{"text": "a"}])
    assert "missing required column" in error_of(read_prompts, p, skip_invalid=True)


# --------------------------------------------------------------------------- normalisation


def test_prompts_normalisation(tmp_path):
    p = jsonl(tmp_path / "p.jsonl", [
        {"prompt": "0456", "answers": "single", "group": 7, "meta": {"k": 1}},
        {"prompt": "two", "answers": ["x", "y"], "group": ""},
        {"prompt": "three", "answers": None},
    ])
    df = read_prompts(p)
    assert df["prompt"].tolist() == ["0456", "two", "three"]  # not coerced to a number
    assert df["answers"].tolist() == [["single"], ["x", "y"], None]
    assert df["group"].tolist() == ["7", None, None]
    assert df["meta"].tolist()[0] == {"k": 1}  # extra columns kept
    assert pd.api.types.is_string_dtype(df["prompt"])


def test_stream_kind(tmp_path):
    p = jsonl(tmp_path / "s.jsonl", [
        {"prompt": "hi", "response": "hello", "namespace": "ns", "group": "g", "ts": 1},
        {"prompt": "yo"},
    ])
    df = read_stream(p)
    assert df["response"].tolist() == ["hello", None]
    assert df["namespace"].tolist() == ["ns", None]
    assert df["ts"].tolist()[0] == 1


def test_pairs_get_pair_ids(tmp_path):
    p = jsonl(tmp_path / "p.jsonl", [
        {"prompt_a": "A", "prompt_b": "B"},
        {"prompt_a": "B", "prompt_b": "a", "pair_id": "mine"},
        {"prompt_a": "B", "prompt_b": "a", "pair_id": None},
    ])
    df = read_pairs(p)
    assert df["pair_id"].tolist() == [pair_id("A", "B"), "mine", pair_id("A", "B")]


# --------------------------------------------------------------------------- mapping, adapters


def test_column_mapping(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("text,cat,answer_text\nhello,g1,hi there\n")
    df = read_prompts(p, columns="prompt=text,group=cat,answers=answer_text")
    assert df.columns.tolist() == ["prompt", "group", "answers"]
    assert df.iloc[0].tolist() == ["hello", "g1", ["hi there"]]
    df = read_prompts(p, columns={"prompt": "text"})
    assert df["prompt"].tolist() == ["hello"] and "cat" in df.columns


def test_column_mapping_swap_and_replace(tmp_path):
    p = jsonl(tmp_path / "p.jsonl", [{"prompt_a": "x", "prompt_b": "y", "alt": "z"}])
    df = read_pairs(p, columns="prompt_a=prompt_b,prompt_b=prompt_a")
    assert (df["prompt_a"][0], df["prompt_b"][0]) == ("y", "x")
    df = read_pairs(p, columns="prompt_b=alt")  # replaces the file's own prompt_b
    assert df.columns.tolist().count("prompt_b") == 1 and df["prompt_b"][0] == "z"


def test_nq_adapter(tmp_path):
    p = jsonl(tmp_path / "nq.jsonl", [
        {"question": "who wrote hamlet", "answer": ["Shakespeare", "William Shakespeare"]},
        {"question": "capital of france", "answer": ["Paris"]},
    ])
    df = read_prompts(p)
    assert df["prompt"].tolist() == ["who wrote hamlet", "capital of france"]
    assert df["answers"].tolist() == [["Shakespeare", "William Shakespeare"], ["Paris"]]
    assert df.attrs["adapter"] == "nq"
    assert read_stream(p)["prompt"].tolist()[1] == "capital of france"


def test_qqp_adapters(tmp_path):
    a = tmp_path / "qqp.tsv"
    a.write_text("text_a\ttext_b\tlabel\nhow old are you\twhat is your age\t1\nhi\tbye\t0\n")
    df = read_pairs(a)
    assert df[["prompt_a", "prompt_b"]].values.tolist() == [
        ["how old are you", "what is your age"], ["hi", "bye"]]
    assert df["label"].tolist() == [1.0, 0.0]
    b = tmp_path / "quora.csv"
    b.write_text("id,qid1,qid2,question1,question2,is_duplicate\n"
                 '0,1,2,"What is 1+1?","What\'s one plus one?",1\n')
    df = read_pairs(b)
    assert df["prompt_a"][0] == "What is 1+1?" and df["label"][0] == 1.0
    assert df["qid1"][0] == "1"  # extra columns kept (CSV cells are read as text)
    assert df.attrs["adapter"] == "qqp"


# --------------------------------------------------------------------------- round trips

TRICKY = ['comma, "quotes"', "tab\there", "new\nline", "ünïcødé ✓ 🙂", "0123", "NA", "[x]"]


def sample_pairs() -> pd.DataFrame:
    n = len(TRICKY)
    return pd.DataFrame({
        "prompt_a": TRICKY,
        "prompt_b": [f"other {i}" for i in range(n)],
        "label": [0.0, 1.0, float("nan"), 0.5, 1.0, 0.0, 0.25],
        "group_a": ["g", None, "g2", None, "g", None, "x"],
        "answers_a": [["a", "b"], None, [], ["only"], ["x, y", 'q"z'], None, ["[1]"]],
    })


@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet", "csv", "tsv", "jsonl.gz",
                                 "csv.gz", "ndjson", "pq"])
def test_round_trip(tmp_path, ext):
    src = read_pairs(jsonl(tmp_path / "src.jsonl", json.loads(
        sample_pairs().to_json(orient="records"))))
    path = tmp_path / "out" / "nested" / f"pairs.{ext}"
    write_table(src, path)
    back = read_pairs(path)
    assert back.columns.tolist() == src.columns.tolist()
    for col in ["prompt_a", "prompt_b", "group_a", "pair_id"]:
        assert back[col].tolist() == src[col].tolist(), col
    np.testing.assert_array_equal(back["label"].to_numpy(), src["label"].to_numpy())
    assert back["answers_a"].tolist() == [["a", "b"], None, [], ["only"], ["x, y", 'q"z'],
                                          None, ["[1]"]]
    if ext.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            assert f.read(1) in (b"{", b"p")


@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet"])
def test_extra_list_columns_round_trip(tmp_path, ext):
    df = pd.DataFrame({"prompt": ["a", "b"], "tags": [["t1", "t2"], []],
                       "scores": [[0.5, 1.0], [2.0]]})
    write_table(df, tmp_path / f"x.{ext}")
    back = read_prompts(tmp_path / f"x.{ext}")
    assert [list(v) for v in back["tags"]] == [["t1", "t2"], []]
    assert [list(v) for v in back["scores"]] == [[0.5, 1.0], [2.0]]


def test_write_table_from_numpy_values(tmp_path):
    df = pd.DataFrame({"prompt": ["a"], "answers": [np.array(["x", "y"], dtype=object)],
                       "n": [np.int64(3)], "when": [pd.Timestamp("2024-01-02")]})
    write_table(df, tmp_path / "x.jsonl")
    rec = json.loads((tmp_path / "x.jsonl").read_text())
    assert rec == {"prompt": "a", "answers": ["x", "y"], "n": 3, "when": "2024-01-02T00:00:00"}


def test_write_table_unknown_extension(tmp_path):
    assert "cannot tell the format" in error_of(write_table, pd.DataFrame({"a": [1]}),
                                                tmp_path / "x.xlsx")


@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet"])
def test_atomic_write_keeps_old_file(tmp_path, ext):
    path = tmp_path / f"out.{ext}"
    write_table(pd.DataFrame({"prompt": ["old"]}), path)
    before = path.read_bytes()
    bad = pd.DataFrame({"prompt": ["new"] * 50 + ["x"], "obj": [1] * 50 + [object()]})
    msg = error_of(write_table, bad, path)
    assert msg.startswith(f"{path}: ")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]  # temp file cleaned up
    assert read_prompts(path)["prompt"].tolist() == ["old"]


def test_atomic_write_names_row_and_column(tmp_path):
    bad = pd.DataFrame({"prompt": ["a", "b"], "obj": [1, object()]})
    assert "row 2: column 'obj'" in error_of(write_table, bad, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_write_replaces_existing_file(tmp_path):
    path = tmp_path / "x.csv"
    write_table(pd.DataFrame({"prompt": ["one"]}), path)
    os.chmod(path, 0o640)
    write_table(pd.DataFrame({"prompt": ["two", "three"]}), path)
    assert read_prompts(path)["prompt"].tolist() == ["two", "three"]
    assert (os.stat(path).st_mode & 0o777) == 0o640


# --------------------------------------------------------------------------- shards


def test_directory_of_shards(tmp_path):
    d = tmp_path / "shards"
    jsonl(d / "part-0001.jsonl", [{"prompt": "c"}, {"prompt": "d"}])
    jsonl(d / "part-0000.jsonl", [{"prompt": "a"}, {"prompt": "b", "group": "g"}])
    write_table(pd.DataFrame({"prompt": ["e"], "answers": [["z"]]}), d / "sub" / "part-0002.parquet")
    (d / "part-0003.jsonl").write_text("")  # empty shard: ignored
    (d / "_SUCCESS").write_text("")
    (d / ".part-0004.jsonl.crc").write_text("junk")
    jsonl(d / ".hidden.jsonl", [{"nope": 1}])
    (d / "README.md").write_text("# not data")
    df = read_prompts(d)
    assert df["prompt"].tolist() == ["a", "b", "c", "d", "e"]
    assert df["group"].tolist() == [None, "g", None, None, None]
    assert df["answers"].tolist() == [None, None, None, None, ["z"]]
    # Errors name the shard and its own row/line number.
    jsonl(d / "part-0001.jsonl", [{"prompt": "c"}, {"prompt": " "}])
    assert error_of(read_prompts, d) == f"{d}/part-0001.jsonl: row 2: column 'prompt' is empty"
    df = read_prompts(d, skip_invalid=True)
    assert df.attrs["skipped"] == 1 and len(df) == 4
    # fmt restricts which files are read.
    assert read_prompts(d, fmt="parquet")["prompt"].tolist() == ["e"]


def test_shard_missing_column_names_shard(tmp_path):
    d = tmp_path / "shards"
    jsonl(d / "a.jsonl", [{"prompt": "x"}])
    jsonl(d / "b.jsonl", [{"text": "y"}])
    assert error_of(read_prompts, d).startswith(f"{d}/b.jsonl: missing required column")


def test_file_uri(tmp_path):
    p = jsonl(tmp_path / "x.jsonl", [{"prompt": "via uri"}])
    assert read_prompts(p.as_uri())["prompt"].tolist() == ["via uri"]
    assert "no such file" in error_of(read_prompts, (tmp_path / "missing.jsonl").as_uri())
    assert "cannot open" in error_of(read_prompts, "nosuchscheme://bucket/x.parquet")
    write_table(pd.DataFrame({"prompt": ["written"]}), (tmp_path / "w.parquet").as_uri())
    assert read_prompts(tmp_path / "w.parquet")["prompt"].tolist() == ["written"]


# --------------------------------------------------------------------------- validate_frame


def test_validate_frame():
    df = pd.DataFrame({"prompt": ["a", "", "c"], "answers": ["x", None, ["y"]]})
    msg = error_of(validate_frame, df, "prompts", source="batch", row_offset=100)
    assert msg == "batch: row 102: column 'prompt' is empty"
    out = validate_frame(df, "prompts", skip_invalid=True)
    assert out["prompt"].tolist() == ["a", "c"]
    assert out["answers"].tolist() == [["x"], ["y"]]
    assert out.attrs["skipped"] == 1
    assert out.attrs["skipped_examples"] == ["<frame>: row 2: column 'prompt' is empty"]
    assert df["prompt"].tolist() == ["a", "", "c"]  # input untouched
    assert "missing required column 'prompt'" in error_of(
        validate_frame, pd.DataFrame({"q": ["a"]}), "prompts")


def test_validate_frame_surrogates_and_parquet_arrays():
    df = pd.DataFrame({"prompt": pd.Series(["ok", "bad \ud800"], dtype=object)})
    assert "row 2: column 'prompt' is not valid Unicode" in error_of(
        validate_frame, df, "prompts")
    arrays = pd.DataFrame({"prompt": ["a"], "answers": [np.array(["p", "q"], dtype=object)]})
    assert validate_frame(arrays, "prompts")["answers"].tolist() == [["p", "q"]]


# --------------------------------------------------------------------------- property tests

_PROPERTY = settings(max_examples=120, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def prop_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prop")


def _only_data_errors(directory: Path, content: bytes, kind: str) -> None:
    """read_table either returns a non-empty frame or raises DataError, nothing else."""
    path = directory / "prop.jsonl"
    with open(path, "wb") as f:
        f.write(content)
    for skip in (False, True):
        try:
            df = read_table(path, kind, skip_invalid=skip)
        except DataError:
            continue
        assert isinstance(df, pd.DataFrame) and len(df) > 0


@_PROPERTY
@given(text=st.text(), kind=st.sampled_from(sorted(KINDS)))
def test_arbitrary_text_only_raises_data_error(prop_dir, text, kind):
    _only_data_errors(prop_dir, text.encode("utf-8", "surrogatepass"), kind)


@_PROPERTY
@given(content=st.binary(max_size=200), kind=st.sampled_from(sorted(KINDS)))
def test_arbitrary_bytes_only_raise_data_error(prop_dir, content, kind):
    _only_data_errors(prop_dir, content, kind)


_KEYS = st.sampled_from(["prompt", "prompt_a", "prompt_b", "answers", "answers_a", "label",
                         "group", "group_a", "pair_id", "question", "answer", "text_a",
                         "text_b", "is_duplicate", "response", "extra"])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                 max_size=3),
    max_leaves=6,
)


@_PROPERTY
@given(rows=st.lists(st.dictionaries(_KEYS, _JSON, max_size=5), max_size=6),
       kind=st.sampled_from(sorted(KINDS)))
def test_arbitrary_records_only_raise_data_error(prop_dir, rows, kind):
    text = "\n".join(json.dumps(r) for r in rows)
    _only_data_errors(prop_dir, text.encode("utf-8", "surrogatepass"), kind)


# --------------------------------------------------------------------------- Ray Data


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        kw = {}
        tmp = os.environ.get("RAY_TMPDIR")
        if tmp and len(tmp) < 40:
            kw["_temp_dir"] = tmp
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, **kw)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.ray
def test_read_dataset(ray_cluster, tmp_path):
    import ray.data

    d = tmp_path / "shards"
    jsonl(d / "a.jsonl", [{"text": "0456", "answer": "x"}, {"text": "hi"}])
    jsonl(d / "b.jsonl", [{"text": "  "}, {"text": "there", "answer": ["y", "z"]}],
          raw_lines={2: "{broken"})
    ds = read_dataset(d, "prompts", columns="prompt=text,answers=answer", skip_invalid=True)
    assert isinstance(ds, ray.data.Dataset)
    rows = sorted(ds.take_all(), key=lambda r: r["prompt"])
    assert [r["prompt"] for r in rows] == ["0456", "hi", "there"]  # "0456" stays a string
    assert [None if r["answers"] is None else list(r["answers"]) for r in rows] == [
        ["x"], None, ["y", "z"]]

    p = tmp_path / "pairs.parquet"
    write_table(pd.DataFrame({"question1": ["a", "b"], "question2": ["c", "d"],
                              "is_duplicate": [1, 0]}), p)
    rows = read_dataset(p, "pairs").take_all()
    assert [(r["prompt_a"], r["label"], r["pair_id"]) for r in rows] == [
        ("a", 1.0, pair_id("a", "c")), ("b", 0.0, pair_id("b", "d"))]

    c = tmp_path / "prompts.csv"
    write_table(pd.DataFrame({"prompt": ["0123", "multi\nline, quoted"],
                              "answers": [["a", "b"], None]}), c)
    rows = read_dataset(c, "prompts").take_all()
    assert [r["prompt"] for r in rows] == ["0123", "multi\nline, quoted"]
    assert list(rows[0]["answers"]) == ["a", "b"] and rows[1]["answers"] is None

    bad = jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": ""}])
    with pytest.raises(Exception) as info:
        read_dataset(bad, "prompts").materialize()
    assert "column 'prompt' is empty" in str(info.value)
    with pytest.raises(DataError):  # file-level problems raise before Ray runs
        read_dataset(tmp_path / "nope.jsonl", "prompts")


def test_symlinked_folder_loop_in_shards_is_not_followed(tmp_path):
    import os

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part-0.jsonl").write_text('{"prompt": "a"}\n')
    os.symlink("..", shards / "up")
    os.symlink(".", shards / "self")
    df = read_prompts(shards)
    assert df["prompt"].tolist() == ["a"]
