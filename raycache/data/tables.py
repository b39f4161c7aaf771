"""Table readers and writers (pandas / pyarrow, no Ray): read, validate and write prompts, prompt
pairs and request streams as DataFrames.

Inputs may be JSONL (``.jsonl``/``.ndjson``), JSON arrays of objects (``.json``),
Parquet (``.parquet``/``.pq``), CSV (``.csv``) or TSV (``.tsv``); text formats may
be compressed (``.gz``, ``.bz2``, ``.zst``).  A path may be a local file, a
directory of shards (every matching file below it, in sorted order) or any URI
that :func:`pyarrow.fs.FileSystem.from_uri` understands (``s3://bucket/x.parquet``,
``gs://...``, ``file:///...``).

Every problem is reported as a :class:`DataError` naming the file, the row and
what is wrong, e.g. ``pairs.jsonl: row 17: column 'prompt_a' is empty``.  Rows are
numbered from 1; for JSONL the row number is the line number.

Three kinds of table are understood (see :data:`KINDS`):

* ``prompts``: ``prompt`` (required), ``answers`` (list of str), ``group``;
* ``pairs``: ``prompt_a``, ``prompt_b`` (required), ``label`` (float in [0, 1],
  NaN = unlabelled), ``group_a``, ``group_b``, ``answers_a``, ``answers_b``,
  ``pair_id`` (filled in with :func:`pair_id` where missing);
* ``stream``: ``prompt`` (required), ``group``, ``answers``, ``response``,
  ``namespace``.

Other columns are passed through untouched.  After validation required text
columns have pandas' string dtype, optional text columns are object columns
holding ``str`` or ``None`` (an empty string counts as missing), answer columns
hold ``list[str]`` or ``None`` and ``label`` is ``float64``.

The Ray Data reader of the same files is :mod:`raycache.data.ray_readers`; both are re-exported by
:mod:`raycache.data`.
"""

from __future__ import annotations

import codecs
import csv
import datetime as _dt
import gzip
import hashlib
import io
import json
import logging
import math
import numbers
import os
import types
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd

from raycache.io import atomic_open, filesystem, is_remote, local_file_path

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.fs as pafs

__all__ = [
    "DataError",
    "KINDS",
    "Schema",
    "normalize_text",
    "pair_id",
    "parse_columns",
    "read_pairs",
    "read_prompts",
    "read_stream",
    "read_table",
    "stream_namespaces",
    "validate_frame",
    "write_table",
]

log = logging.getLogger("raycache.data")

#: How many skipped-row messages are kept in ``df.attrs["skipped_examples"]``.
MAX_SKIPPED_EXAMPLES = 5


class DataError(ValueError):
    """An input file (or frame) is unreadable or does not match its schema."""


# --------------------------------------------------------------------------- schemas


@dataclass(frozen=True, eq=False)
class Schema:
    """Columns of one kind of table.

    ``optional`` maps a column to its type: ``"str"`` (optional text), ``"answers"``
    (list of str; a single str is wrapped) or ``"label"`` (float in [0, 1] or NaN).
    """

    kind: str
    required: tuple[str, ...]
    optional: Mapping[str, str]

    @property
    def columns(self) -> tuple[str, ...]:
        return self.required + tuple(self.optional)


def _schema_of(kind: str, required: tuple[str, ...], **optional: str) -> Schema:
    return Schema(kind, required, types.MappingProxyType(dict(optional)))


#: Schema per kind of table: ``KINDS["pairs"].required == ("prompt_a", "prompt_b")``.
KINDS: Mapping[str, Schema] = types.MappingProxyType({
    "prompts": _schema_of("prompts", ("prompt",), answers="answers", group="str"),
    "pairs": _schema_of(
        "pairs", ("prompt_a", "prompt_b"),
        label="label", group_a="str", group_b="str",
        answers_a="answers", answers_b="answers", pair_id="str",
    ),
    "stream": _schema_of(
        "stream", ("prompt",),
        group="str", answers="answers", response="str", namespace="str",
    ),
})


def _schema(kind: str) -> Schema:
    try:
        return KINDS[kind]
    except (KeyError, TypeError):
        raise DataError(
            f"unknown kind {kind!r}; expected one of: {', '.join(KINDS)}") from None


# --------------------------------------------------------------------------- text helpers


def normalize_text(s: str) -> str:
    """Unicode NFKC, lower case, runs of whitespace collapsed to one space, stripped."""
    if not isinstance(s, str):
        raise TypeError(f"normalize_text expects str, got {type(s).__name__}")
    return " ".join(unicodedata.normalize("NFKC", s).lower().split())


def stream_namespaces(stream: pd.DataFrame, default: str = "default") -> np.ndarray:
    """[n] object array of str: each arrival's ``namespace`` (``default`` where the column is
    missing or the cell is empty)."""
    if "namespace" not in stream.columns:
        return np.full(len(stream), default, dtype=object)
    return stream["namespace"].fillna(default).astype(str).to_numpy(dtype=object)


def pair_id(prompt_a: str, prompt_b: str) -> str:
    """Stable 16-hex-digit id of the unordered pair ``{prompt_a, prompt_b}``.

    The prompts are normalised with :func:`normalize_text`, so the id ignores case
    and whitespace differences and the order of the two prompts.
    """
    a, b = sorted((normalize_text(prompt_a), normalize_text(prompt_b)))
    # "\n" cannot occur in a normalised prompt, so it separates unambiguously.
    return hashlib.sha1(f"{a}\n{b}".encode("utf-8", "surrogatepass")).hexdigest()[:16]


# --------------------------------------------------------------------------- column mapping


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """Parse a column mapping ``"ours=theirs,ours2=theirs2"`` into ``{ours: theirs}``.

    A dict is checked and copied; ``None`` or ``""`` give ``{}``.  Blank entries
    (``"a=b,"``) are ignored.  Raises :class:`DataError` on a malformed spec.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        items = list(spec.items())
        for ours, theirs in items:
            if not isinstance(ours, str) or not isinstance(theirs, str):
                raise DataError(
                    f"bad column mapping {dict(spec)!r}: names must be strings")
        entries = [(o.strip(), t.strip(), f"{o}={t}") for o, t in items]
        shown = ",".join(f"{o}={t}" for o, t in items)
    elif isinstance(spec, str):
        entries = []
        for part in spec.split(","):
            if not part.strip():
                continue
            if part.count("=") != 1:
                raise DataError(
                    f"bad column mapping {spec!r}: entry {part.strip()!r} should look "
                    "like ours=theirs, e.g. --columns prompt=text")
            ours, theirs = part.split("=")
            entries.append((ours.strip(), theirs.strip(), part.strip()))
        shown = spec
    else:
        raise DataError(
            f"bad column mapping of type {type(spec).__name__}; expected a string "
            "like 'prompt=text' or a dict")
    out: dict[str, str] = {}
    sources: dict[str, str] = {}
    for ours, theirs, raw in entries:
        if not ours or not theirs:
            raise DataError(
                f"bad column mapping {shown!r}: entry {raw!r} has an empty column name")
        if ours in out:
            raise DataError(f"bad column mapping {shown!r}: column {ours!r} is mapped twice")
        if theirs in sources:
            raise DataError(
                f"bad column mapping {shown!r}: input column {theirs!r} is used for both "
                f"{sources[theirs]!r} and {ours!r}")
        out[ours] = theirs
        sources[theirs] = ours
    return out


def _apply_columns(df: pd.DataFrame, mapping: Mapping[str, str], source: str) -> pd.DataFrame:
    """Rename input columns to our names (``mapping`` is ``{ours: theirs}``)."""
    if not mapping:
        return df
    present = set(df.columns)
    absent = [(o, t) for o, t in mapping.items() if t not in present]
    if absent:
        ours, theirs = absent[0]
        raise DataError(
            f"{source}: --columns maps {ours!r} to column {theirs!r}, which is not in the "
            f"file (found: {_found(df)})")
    renames = {t: o for o, t in mapping.items() if t != o}
    if not renames:
        return df
    # An existing column with one of our names is replaced by the mapped one, unless
    # it is itself being renamed (mappings may swap columns).
    clobbered = [o for o in renames.values() if o in present and o not in renames]
    if clobbered:
        log.warning("%s: column(s) %s replaced by the --columns mapping",
                    source, ", ".join(map(repr, clobbered)))
        df = df.drop(columns=clobbered)
    return df.rename(columns=renames)


# NQ-open {question, answer: [...]} and QQP {text_a, text_b, label} /
# {question1, question2, is_duplicate} (GLUE-style sentence1/sentence2 too).
_PROMPT_ADAPTERS = (("nq", "question", "answer"),)
_PAIR_ADAPTERS = (
    ("qqp", "text_a", "text_b", None),
    ("qqp", "question1", "question2", "is_duplicate"),
    ("glue", "sentence1", "sentence2", None),
)


def _adapt(df: pd.DataFrame, schema: Schema, source: str) -> pd.DataFrame:
    """Recognise well-known public layouts when our required columns are absent."""
    cols = set(df.columns)
    if all(c in cols for c in schema.required):
        return df
    renames: dict[str, str] = {}
    name = None
    if schema.kind in ("prompts", "stream") and "prompt" not in cols:
        for name, q, a in _PROMPT_ADAPTERS:
            if q in cols:
                renames[q] = "prompt"
                if a in cols and "answers" not in cols:
                    renames[a] = "answers"
                break
    elif schema.kind == "pairs" and not cols & {"prompt_a", "prompt_b"}:
        for name, a, b, lab in _PAIR_ADAPTERS:
            if a in cols and b in cols:
                renames.update({a: "prompt_a", b: "prompt_b"})
                if lab is not None and lab in cols and "label" not in cols:
                    renames[lab] = "label"
                break
    if not renames:
        return df
    log.info("%s: reading %s-style columns as %s", source, name,
             ", ".join(f"{k}->{v}" for k, v in renames.items()))
    out = df.rename(columns=renames)
    out.attrs["adapter"] = name
    return out


_KNOWN_COLUMNS = frozenset(
    [c for schema in KINDS.values() for c in schema.columns]
    + [c for _, q, a in _PROMPT_ADAPTERS for c in (q, a)]
    + [c for _, a, b, lab in _PAIR_ADAPTERS for c in (a, b, lab) if c]
)

_PROMPT_LIKE = ("text", "question", "query", "input", "instruction", "prompt_text",
                "content", "sentence", "utterance", "message", "request")


def _found(df: pd.DataFrame, limit: int = 20) -> str:
    names = [str(c) for c in df.columns]
    if not names:
        return "no columns"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_required(df: pd.DataFrame, schema: Schema, source: str) -> None:
    dup = df.columns[df.columns.duplicated()]
    if len(dup):
        raise DataError(f"{source}: duplicate column name(s): {', '.join(map(str, dup))}")
    missing = [c for c in schema.required if c not in df.columns]
    if not missing:
        return
    # Suggest a mapping: prefer prompt-like names, then any column we don't know.
    spare = [str(c) for c in df.columns if c not in schema.columns]
    ranked = sorted(spare, key=lambda c: next(
        (i for i, p in enumerate(_PROMPT_LIKE) if p in c.lower()), len(_PROMPT_LIKE)))
    guess = []
    for i, m in enumerate(missing):
        guess.append(f"{m}={ranked[i] if i < len(ranked) else '<column>'}")
    noun = "column" if len(missing) == 1 else "columns"
    raise DataError(
        f"{source}: missing required {noun} {', '.join(map(repr, missing))} "
        f"(found: {_found(df)}); use --columns {','.join(guess)}")


# --------------------------------------------------------------------------- validation


def _is_missing(v: Any) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    return isinstance(v, float) and v != v


def _type_name(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    if isinstance(v, (dict,)):
        return "object"
    if isinstance(v, (list, tuple, np.ndarray)):
        return "list"
    return type(v).__name__


def _show(v: Any, width: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= width else r[: width - 3] + "..."


def _check_text(col: str, v: Any) -> str | None:
    """Error message for a required text value, or None if it is fine."""
    if isinstance(v, str):
        return None if v.strip() else f"column {col!r} is empty"
    if _is_missing(v):
        return f"column {col!r} is missing or null"
    return f"column {col!r} must be a string, got {_type_name(v)} {_show(v)}"


def _coerce_str(col: str, v: Any) -> tuple[Any, str | None]:
    if isinstance(v, str):
        return (str(v) if v.strip() else None), None
    if _is_missing(v):
        return None, None
    if isinstance(v, (bool, np.bool_)):
        return None, f"column {col!r} must be a string, got bool {v!r}"
    if isinstance(v, numbers.Integral):
        return str(int(v)), None  # numeric ids are common for groups
    if isinstance(v, numbers.Real) and math.isfinite(v) and float(v).is_integer():
        return str(int(v)), None  # int columns with nulls come back as float
    return None, f"column {col!r} must be a string, got {_type_name(v)} {_show(v)}"


def _coerce_answers(col: str, v: Any, json_lists: bool) -> tuple[Any, str | None]:
    if isinstance(v, str):
        if not v.strip():
            return None, None
        if json_lists and v.lstrip().startswith("["):
            # CSV/TSV cells holding a JSON array (as written by write_table).
            try:
                parsed = json.loads(v)
            except (ValueError, RecursionError):
                parsed = None
            if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
                return parsed, None
        return [str(v)], None
    if isinstance(v, (list, tuple, np.ndarray)):
        out = []
        for x in (v.tolist() if isinstance(v, np.ndarray) else v):
            if not isinstance(x, str):
                return None, (f"column {col!r} must be a list of strings, "
                              f"got an element of type {_type_name(x)} {_show(x)}")
            out.append(str(x))
        return out, None
    if _is_missing(v):
        return None, None
    return None, (f"column {col!r} must be a string or a list of strings, "
                  f"got {_type_name(v)} {_show(v)}")


_TRUE = {"true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0}


def _coerce_label(col: str, v: Any) -> tuple[float, str | None]:
    nan = float("nan")
    if isinstance(v, (bool, np.bool_)):
        return float(v), None
    if isinstance(v, str):
        s = v.strip()
        if not s:
            return nan, None
        if s.lower() in _TRUE:
            return _TRUE[s.lower()], None
        try:
            f = float(s)
        except ValueError:
            return nan, f"column {col!r} must be a number in [0, 1], got {_show(v)}"
    elif _is_missing(v):
        return nan, None
    elif isinstance(v, numbers.Real):
        try:
            f = float(v)
        except (OverflowError, ValueError):
            f = math.inf
    else:
        return nan, f"column {col!r} must be a number in [0, 1], got {_type_name(v)} {_show(v)}"
    if f != f:
        return nan, None
    if not 0.0 <= f <= 1.0:
        return nan, f"column {col!r} must be in [0, 1], got {_show(v)}"
    return f, None


def _validate(
    df: pd.DataFrame,
    schema: Schema,
    where: Callable[[int], str],
    skip_invalid: bool,
    json_lists: bool = False,
) -> tuple[pd.DataFrame, list[str]]:
    """Check and normalise ``df`` (required columns already present).

    ``where(i)`` names row position ``i`` (e.g. ``"x.jsonl: row 3"``).  Returns the
    valid rows and the messages for dropped rows; without ``skip_invalid`` the
    first invalid row raises :class:`DataError`.
    """
    n = len(df)
    errors: dict[int, str] = {}

    def note(i: int, msg: str) -> None:
        if i not in errors:
            errors[i] = msg

    new: dict[str, Any] = {}
    for col in schema.required:
        vals = df[col].tolist()
        for i, v in enumerate(vals):
            if type(v) is str and v and not v[0].isspace():
                continue  # fast path
            msg = _check_text(col, v)
            if msg:
                note(i, msg)
                vals[i] = ""
            elif type(v) is not str:
                vals[i] = str(v)
        new[col] = vals
    for col, typ in schema.optional.items():
        if col not in df.columns:
            continue
        vals = df[col].tolist()
        if typ == "label":
            out = np.empty(n, dtype=np.float64)
            for i, v in enumerate(vals):
                out[i], msg = _coerce_label(col, v)
                if msg:
                    note(i, msg)
        else:
            out = [None] * n
            for i, v in enumerate(vals):
                if typ == "answers":
                    out[i], msg = _coerce_answers(col, v, json_lists)
                else:
                    out[i], msg = _coerce_str(col, v)
                if msg:
                    note(i, msg)
        new[col] = out

    text: dict[str, pd.Series] = {}
    for col in schema.required:
        vals = new[col]
        try:
            text[col] = pd.Series(vals, index=df.index, dtype="str")
        except UnicodeEncodeError:
            # pandas 3 stores str columns in Arrow, which needs valid UTF-8; a lone
            # surrogate (legal as a JSON escape, "\ud800") cannot be stored.
            for i, v in enumerate(vals):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    note(i, f"column {col!r} is not valid Unicode (unpaired surrogate)")
                    vals[i] = ""
            text[col] = pd.Series(vals, index=df.index, dtype="str")

    if errors and not skip_invalid:
        first = min(errors)
        raise DataError(f"{where(first)}: {errors[first]}")

    out_df = df.copy(deep=False)
    out_df.attrs = dict(df.attrs)
    for col, vals in new.items():
        if col in schema.required:
            out_df[col] = text[col]
        elif schema.optional[col] == "label":
            out_df[col] = pd.Series(vals, index=df.index, dtype=np.float64)
        else:
            out_df[col] = pd.Series(vals, index=df.index, dtype=object)
    if errors:
        keep = np.ones(n, dtype=bool)
        keep[list(errors)] = False
        out_df = out_df.iloc[np.flatnonzero(keep)]
    out_df = out_df.reset_index(drop=True)
    if schema.kind == "pairs":
        out_df = _fill_pair_ids(out_df)
    messages = [f"{where(i)}: {errors[i]}" for i in sorted(errors)]
    return out_df, messages


def _fill_pair_ids(df: pd.DataFrame) -> pd.DataFrame:
    a = df["prompt_a"].tolist()
    b = df["prompt_b"].tolist()
    if "pair_id" in df.columns:
        ids = df["pair_id"].tolist()
        ids = [x if x is not None else pair_id(p, q) for x, p, q in zip(ids, a, b)]
    else:
        ids = [pair_id(p, q) for p, q in zip(a, b)]
    df["pair_id"] = pd.Series(ids, index=df.index, dtype=object)
    return df


def _finish(df: pd.DataFrame, messages: list[str], source: str) -> pd.DataFrame:
    df.attrs["skipped"] = len(messages)
    df.attrs["skipped_examples"] = messages[:MAX_SKIPPED_EXAMPLES]
    if messages:
        log.warning("%s: skipped %d invalid row(s); first: %s", source, len(messages),
                    messages[0])
    return df


def validate_frame(
    df: pd.DataFrame,
    kind: str,
    source: str = "<frame>",
    row_offset: int = 0,
    skip_invalid: bool = False,
) -> pd.DataFrame:
    """Validate and normalise a frame that already uses our column names.

    Row ``i`` (0-based position) is reported as ``row_offset + i + 1``.  Returns a
    new frame; with ``skip_invalid`` invalid rows are dropped and counted in
    ``attrs["skipped"]`` / ``attrs["skipped_examples"]``.  Works on Ray Data pandas
    batches too.
    """
    schema = _schema(kind)
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"{source}: expected a pandas DataFrame, got {type(df).__name__}")
    _check_required(df, schema, source)
    out, messages = _validate(
        df, schema, lambda i: f"{source}: row {row_offset + i + 1}", skip_invalid)
    return _finish(out, messages, source)


# --------------------------------------------------------------------------- locating inputs

_FORMAT_EXTS = {
    "jsonl": ("jsonl", "ndjson"),
    "json": ("json",),
    "parquet": ("parquet", "pq"),
    "csv": ("csv",),
    "tsv": ("tsv", "tab"),
}
_FMT_ALIASES = {ext: fmt for fmt, exts in _FORMAT_EXTS.items() for ext in exts}
_COMPRESSIONS = {"gz": "gzip", "bz2": "bz2", "zst": "zstd"}


def _norm_fmt(fmt: str | None) -> str | None:
    if fmt is None:
        return None
    f = str(fmt).lower().lstrip(".")
    if f not in _FMT_ALIASES:
        raise DataError(f"unknown format {fmt!r}; expected one of: {', '.join(_FORMAT_EXTS)}")
    return _FMT_ALIASES[f]


def _detect(name: str, fmt: str | None) -> tuple[str | None, str | None]:
    """(format, compression) of a file name; ``fmt`` overrides the extension."""
    base = name.lower().rsplit("/", 1)[-1]
    compression = None
    stem, dot, ext = base.rpartition(".")
    if dot and ext in _COMPRESSIONS:
        compression = _COMPRESSIONS[ext]
        base = stem
    if fmt is not None:
        return fmt, compression
    stem, dot, ext = base.rpartition(".")
    return (_FMT_ALIASES.get(ext) if dot else None), compression


@dataclass(frozen=True)
class _Input:
    fs: Any  # pyarrow.fs.FileSystem
    path: str  # path within fs
    name: str  # what error messages call it
    fmt: str
    compression: str | None


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    import pyarrow as pa

    try:
        return filesystem(path)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot open: {exc}") from exc


def _list_inputs(path: Any, fmt: str | None) -> list[_Input]:
    import pyarrow as pa
    import pyarrow.fs as pafs

    shown = os.fspath(path)
    if not isinstance(shown, str):
        shown = os.fsdecode(shown)
    fs, root = _filesystem(shown)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{shown}: no such file or directory")
        if info.type != pafs.FileType.Directory:
            f, comp = _detect(info.base_name, fmt)
            if f is None:
                raise DataError(
                    f"{shown}: cannot tell the format from the file name; pass fmt= "
                    f"(one of: {', '.join(_FORMAT_EXTS)})")
            if f == "parquet" and comp:
                raise DataError(f"{shown}: compressed parquet files are not supported")
            return [_Input(fs, root, shown, f, comp)]
        if isinstance(fs, pafs.LocalFileSystem):
            # os.walk does not follow symlinked folders (a link to '..' would loop forever)
            files = [os.path.join(d, name).replace(os.sep, "/") for d, _, names in os.walk(root)
                     for name in names]
        else:
            files = [fi.path for fi in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                     if fi.type == pafs.FileType.File]
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{shown}: cannot read: {exc}") from exc
    found = []
    prefix = root.rstrip("/") + "/"
    for file_path in files:
        if not file_path.startswith(prefix):
            continue
        rel = file_path[len(prefix):]
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue  # hidden files, _SUCCESS, _metadata, ...
        f, comp = _detect(rel.rsplit("/", 1)[-1], None)
        if f is None or (f == "parquet" and comp) or (fmt is not None and f != fmt):
            continue
        found.append(_Input(fs, file_path, shown.rstrip("/") + "/" + rel, f, comp))
    if not found:
        what = fmt or "/".join(_FORMAT_EXTS)
        raise DataError(f"{shown}: directory has no {what} files")
    return sorted(found, key=lambda x: x.path)


# --------------------------------------------------------------------------- readers


@dataclass
class _Raw:
    df: pd.DataFrame
    rows: list[int] | None  # row number per position (None: 1..n)
    errors: list[str]  # rows dropped while parsing (skip_invalid only)


def _read_bytes(inp: _Input) -> bytes:
    import pyarrow as pa

    try:
        with inp.fs.open_input_stream(inp.path, compression=inp.compression) as f:
            return f.read()
    except (pa.ArrowException, OSError, EOFError) as exc:
        raise DataError(f"{inp.name}: cannot read: {exc}") from exc


def _records_to_frame(records: list[dict], n: int | None = None) -> pd.DataFrame:
    """Columns in order of first appearance; a missing key becomes None.

    Columns we validate stay object columns holding the parsed JSON values (so
    errors quote them as written); other columns get pandas' dtype inference.
    """
    n = len(records) if n is None else n
    cols: dict[str, list] = {}
    for i, rec in enumerate(records):
        for k, v in rec.items():
            col = cols.get(k)
            if col is None:
                col = cols[k] = [None] * n
            col[i] = v
    data = {}
    for k, vals in cols.items():
        s = pd.Series(vals, dtype=object)
        if k in _KNOWN_COLUMNS:
            data[k] = s
            continue
        try:
            s = s.infer_objects()
        except Exception:  # inference is best effort (e.g. lone surrogates)
            s = pd.Series(vals, dtype=object)
        data[k] = s
    return pd.DataFrame(data, index=pd.RangeIndex(n))


def _json_kind(obj: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            type(None): "null"}.get(type(obj), "number")


def _parse_json_line(raw: bytes) -> tuple[Any, str | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 ({exc.reason} at byte {exc.start + 1})"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} (column {exc.colno})"
    except (ValueError, RecursionError) as exc:
        return None, f"invalid JSON: {exc}"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {_json_kind(obj)}"
    if "\\ud" in text.lower() and _lone_surrogate(obj):
        return None, "invalid JSON: unpaired surrogate escape (not valid Unicode)"
    return obj, None


def _lone_surrogate(obj: Any) -> bool:
    """Whether a parsed JSON value holds a string that is not valid Unicode."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _read_jsonl_bytes(data: bytes, name: str, skip_invalid: bool) -> _Raw:
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    records, rows, errors = _json_line_records(enumerate(data.split(b"\n"), 1), skip_invalid,
                                               lambda n, raw, msg: f"{name}: line {n}: {msg}")
    return _Raw(_records_to_frame(records), rows, errors)


def _json_line_records(lines: Iterable[tuple[int, bytes]], skip_invalid: bool,
                       describe: Callable[[int, bytes, str], str],
                       ) -> tuple[list[dict], list[int], list[str]]:
    """(records, their line numbers, error messages) of numbered JSONL lines; blank lines are
    skipped; a bad line raises DataError(``describe(number, line, problem)``) unless
    ``skip_invalid``, which collects the message instead."""
    records: list[dict] = []
    rows: list[int] = []
    errors: list[str] = []
    for number, raw in lines:
        raw = raw.strip()
        if not raw:
            continue
        obj, msg = _parse_json_line(raw)
        if msg is None:
            records.append(obj)
            rows.append(number)
            continue
        msg = describe(number, raw, msg)
        if not skip_invalid:
            raise DataError(msg)
        errors.append(msg)
    return records, rows, errors


def _decode_utf8(data: bytes, name: str) -> str:
    """Bytes -> text (a BOM is dropped); a DataError names the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not valid UTF-8 ({exc.reason} at byte {exc.start + 1})") from exc


def _read_json_bytes(data: bytes, name: str, skip_invalid: bool) -> _Raw:
    text = _decode_utf8(data, name)
    if not text.strip():
        return _Raw(_records_to_frame([]), None, [])
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            # Really JSON lines with a .json name.
            return _read_jsonl_bytes(data, name, skip_invalid)
        raise DataError(
            f"{name}: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from exc
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{name}: invalid JSON: {exc}") from exc
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list):
        raise DataError(f"{name}: expected a JSON array of objects, got {_json_kind(obj)}")
    records, rows, errors = [], [], []
    check_unicode = "\\ud" in text.lower()
    for i, rec in enumerate(obj, 1):
        if not isinstance(rec, dict):
            msg = f"{name}: row {i}: expected a JSON object, got {_json_kind(rec)}"
        elif check_unicode and _lone_surrogate(rec):
            msg = f"{name}: row {i}: unpaired surrogate escape (not valid Unicode)"
        else:
            records.append(rec)
            rows.append(i)
            continue
        if not skip_invalid:
            raise DataError(msg)
        errors.append(msg)
    return _Raw(_records_to_frame(records), rows, errors)


def _read_csv_bytes(data: bytes, name: str, sep: str, skip_invalid: bool) -> _Raw:
    text = _decode_utf8(data, name)
    if not text.strip():
        return _Raw(_records_to_frame([]), None, [])
    errors: list[str] = []
    kw: dict[str, Any] = dict(sep=sep, dtype=str, keep_default_na=False, na_filter=False,
                              index_col=False)
    if skip_invalid:
        def bad_line(fields: list[str]) -> None:
            errors.append(f"{name}: malformed row with {len(fields)} fields: "
                          f"{_show(sep.join(fields), 60)}")
            return None
        kw.update(engine="python", on_bad_lines=bad_line)
    try:
        df = pd.read_csv(io.StringIO(text), **kw)
    except pd.errors.EmptyDataError:
        return _Raw(_records_to_frame([]), None, [])
    except (pd.errors.ParserError, ValueError, csv.Error) as exc:
        raise DataError(f"{name}: malformed {'TSV' if sep == chr(9) else 'CSV'}: "
                        f"{str(exc).strip()}") from exc
    df.columns = [str(c) for c in df.columns]
    return _Raw(df.reset_index(drop=True), None, errors)


def _read_parquet(inp: _Input) -> _Raw:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(inp.path, filesystem=inp.fs)
        df = table.to_pandas()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{inp.name}: cannot read parquet: {exc}") from exc
    df.columns = [str(c) for c in df.columns]
    return _Raw(df.reset_index(drop=True), None, [])


def _read_raw(inp: _Input, skip_invalid: bool) -> _Raw:
    if inp.fmt == "parquet":
        return _read_parquet(inp)
    data = _read_bytes(inp)
    if inp.fmt == "jsonl":
        return _read_jsonl_bytes(data, inp.name, skip_invalid)
    if inp.fmt == "json":
        return _read_json_bytes(data, inp.name, skip_invalid)
    return _read_csv_bytes(data, inp.name, "\t" if inp.fmt == "tsv" else ",", skip_invalid)


def read_table(
    path: Any,
    kind: str,
    columns: Mapping[str, str] | str | None = None,
    skip_invalid: bool = False,
    fmt: str | None = None,
) -> pd.DataFrame:
    """Read and validate a table of ``kind`` (``prompts``, ``pairs`` or ``stream``).

    ``path`` is a file, a directory of shards or a pyarrow-filesystem URI; the
    format comes from the extension unless ``fmt`` is given.  ``columns`` maps our
    column names to the file's (``"prompt=text"``).  Without a mapping, NQ-open
    (``question``/``answer``) and QQP (``text_a``/``text_b``/``label`` or
    ``question1``/``question2``/``is_duplicate``) layouts are recognised.

    Raises :class:`DataError` on the first problem; with ``skip_invalid`` invalid
    rows are dropped instead and counted in ``df.attrs["skipped"]`` with the first
    messages in ``df.attrs["skipped_examples"]``.
    """
    schema = _schema(kind)
    mapping = parse_columns(columns)
    inputs = _list_inputs(path, _norm_fmt(fmt))
    shown = inputs[0].name if len(inputs) == 1 else os.fspath(path)

    parts: list[pd.DataFrame] = []
    names: list[str] = []
    row_numbers: list[np.ndarray] = []
    messages: list[str] = []
    adapter = None
    json_lists = False
    for inp in inputs:
        raw = _read_raw(inp, skip_invalid)
        messages.extend(raw.errors)
        if len(raw.df) == 0:
            continue  # empty shard (or every line broken)
        df = _apply_columns(raw.df, mapping, inp.name)
        df = _adapt(df, schema, inp.name)
        adapter = df.attrs.get("adapter", adapter)
        _check_required(df, schema, inp.name)
        json_lists = json_lists or inp.fmt in ("csv", "tsv")
        parts.append(df)
        names.append(inp.name)
        rows = raw.rows if raw.rows is not None else range(1, len(df) + 1)
        row_numbers.append(np.asarray(rows, dtype=np.int64))

    if not parts:
        if messages:
            raise DataError(
                f"{shown}: no valid rows; all {len(messages)} were invalid, "
                f"first: {messages[0]}")
        raise DataError(f"{shown}: no rows")

    if len(parts) == 1:
        df = parts[0]
        df.attrs = {}
    else:
        df = pd.concat(parts, ignore_index=True)
        df.attrs = {}
    file_index = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    rownum = np.concatenate(row_numbers)

    def where(i: int) -> str:
        return f"{names[file_index[i]]}: row {rownum[i]}"

    out, bad = _validate(df, schema, where, skip_invalid, json_lists=json_lists)
    messages.extend(bad)
    if len(out) == 0:
        raise DataError(
            f"{shown}: no valid rows; all {len(messages)} were invalid, first: {messages[0]}")
    if adapter:
        out.attrs["adapter"] = adapter
    return _finish(out, messages, shown)


def read_prompts(path: Any, **kw: Any) -> pd.DataFrame:
    """:func:`read_table` with ``kind="prompts"``."""
    return read_table(path, "prompts", **kw)


def read_pairs(path: Any, **kw: Any) -> pd.DataFrame:
    """:func:`read_table` with ``kind="pairs"``."""
    return read_table(path, "pairs", **kw)


def read_stream(path: Any, **kw: Any) -> pd.DataFrame:
    """:func:`read_table` with ``kind="stream"``."""
    return read_table(path, "stream", **kw)


# --------------------------------------------------------------------------- writing


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        return None if v != v else v
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return _jsonable(v.item())
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return v.total_seconds()
    raise TypeError(f"value of type {type(v).__name__} cannot be written as JSON")


def _json_rows(df: pd.DataFrame, name: str) -> Iterator[str]:
    cols = [str(c) for c in df.columns]
    for i, values in enumerate(df.itertuples(index=False, name=None), 1):
        rec = {}
        for col, v in zip(cols, values):
            try:
                rec[col] = _jsonable(v)
            except TypeError as exc:
                raise DataError(f"{name}: row {i}: column {col!r}: {exc}") from exc
        yield json.dumps(rec, ensure_ascii=False)


def _write_json_lines(df: pd.DataFrame, f: Any, name: str) -> None:
    for line in _json_rows(df, name):
        f.write(line.encode("utf-8"))
        f.write(b"\n")


def _write_json_array(df: pd.DataFrame, f: Any, name: str) -> None:
    f.write(b"[")
    for i, line in enumerate(_json_rows(df, name)):
        f.write(b"\n" if i == 0 else b",\n")
        f.write(line.encode("utf-8"))
    f.write(b"\n]\n")


def _write_delimited(df: pd.DataFrame, f: Any, sep: str) -> None:
    out = df.copy(deep=False)
    for col in out.columns:
        s = out[col]
        if s.dtype == object:
            out[col] = [json.dumps(_jsonable(v), ensure_ascii=False)
                        if isinstance(v, (list, tuple, dict, np.ndarray)) else v
                        for v in s.tolist()]
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    try:
        out.to_csv(text, index=False, sep=sep, lineterminator="\n")
        text.flush()
    finally:
        text.detach()


def _write_parquet(df: pd.DataFrame, f: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = df.copy(deep=False)
    plain.attrs = {}
    table = pa.Table.from_pandas(plain, preserve_index=False)
    pq.write_table(table, f)


def _serialise(df: pd.DataFrame, fmt: str, compression: str | None, f: Any, name: str) -> None:
    if compression == "gzip":
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
            _serialise(df, fmt, None, gz, name)
        return
    if fmt == "jsonl":
        _write_json_lines(df, f, name)
    elif fmt == "json":
        _write_json_array(df, f, name)
    elif fmt == "parquet":
        _write_parquet(df, f)
    else:
        _write_delimited(df, f, "\t" if fmt == "tsv" else ",")


def write_table(df: pd.DataFrame, path: Any, fmt: str | None = None) -> None:
    """Write ``df`` as jsonl/json/parquet/csv/tsv (by extension, or ``fmt``).

    Local files are written atomically: to a temporary file in the same directory
    that then replaces ``path``, so a failure never leaves a half-written file.
    Parent directories are created.  List columns survive JSONL, JSON and Parquet
    round trips; CSV/TSV store them as JSON arrays, which :func:`read_table`
    decodes again for answer columns.  URIs (``s3://...``) are written in one
    upload after serialising in memory.
    """
    import pyarrow as pa

    if not isinstance(df, pd.DataFrame):
        raise DataError(f"write_table expects a pandas DataFrame, got {type(df).__name__}")
    shown = os.fspath(path)
    f, compression = _detect(shown, _norm_fmt(fmt))
    if f is None:
        raise DataError(f"{shown}: cannot tell the format from the file name; pass fmt= "
                        f"(one of: {', '.join(_FORMAT_EXTS)})")
    if compression not in (None, "gzip") or (f == "parquet" and compression):
        raise DataError(f"{shown}: writing {compression} compressed {f} is not supported")
    failures = (TypeError, ValueError, OverflowError, UnicodeEncodeError, pa.ArrowException)
    try:
        if is_remote(shown):
            fs, fspath = _filesystem(shown)
            buf = io.BytesIO()
            _serialise(df, f, compression, buf, shown)
            with fs.open_output_stream(fspath, compression=None) as out:
                out.write(buf.getvalue())
            return
        with atomic_open(local_file_path(shown), "wb", keep_mode=True) as out:
            _serialise(df, f, compression, out, shown)
    except DataError:
        raise
    except failures as exc:
        raise DataError(f"{shown}: cannot write {f}: {exc}") from exc
    except OSError as exc:  # the folder can't be made, no permission, disk full, ...
        raise DataError(f"{shown}: cannot write: {exc.strerror or exc}") from exc
