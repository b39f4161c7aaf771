"""Ray Data readers: the files :mod:`raycache.data.tables` reads, as a streaming, sharded
``ray.data.Dataset`` validated batch by batch with the same schemas (:func:`read_dataset`).

Ray is imported only inside :func:`read_dataset`, so this module imports fast.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
from typing import TYPE_CHECKING, Any, Mapping

import pandas as pd

from raycache.data.tables import (
    DataError,
    Schema,
    _adapt,
    _apply_columns,
    _check_required,
    _Input,
    _is_missing,
    _jsonable,
    _json_line_records,
    _list_inputs,
    _norm_fmt,
    _records_to_frame,
    _schema,
    _show,
    _validate,
    parse_columns,
)

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

__all__ = ["read_dataset"]

log = logging.getLogger("raycache.data")


def _csv_header(inp: _Input, sep: str) -> list[str]:
    """Column names from the first line(s) of a CSV/TSV file."""
    import pyarrow as pa

    try:
        with inp.fs.open_input_stream(inp.path, compression=inp.compression) as f:
            head = f.read(1 << 16)
    except (pa.ArrowException, OSError, EOFError) as exc:
        raise DataError(f"{inp.name}: cannot read: {exc}") from exc
    text = head.decode("utf-8-sig", errors="replace")
    try:
        return [str(c) for c in pd.read_csv(io.StringIO(text), sep=sep, nrows=0).columns]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError):
        return []


def _ray_batch(
    batch: pd.DataFrame,
    *,
    kind: str,
    mapping: Mapping[str, str],
    skip_invalid: bool,
    fmt: str,
    source: str,
) -> pd.DataFrame:
    """Map one Ray Data batch to a validated frame (row numbers are batch-relative)."""
    schema = _schema(kind)
    errors: list[str] = []
    if fmt == "jsonl":
        lines = ((j, line if isinstance(line, bytes) else str(line).encode("utf-8", "surrogatepass"))
                 for j, line in enumerate(batch["text"].tolist(), 1))
        records, _, bad = _json_line_records(
            lines, skip_invalid,
            lambda j, raw, msg: f"{source}: batch line {j}: {msg} in {_show(raw.decode('utf-8', 'replace'))}")
        errors.extend(bad)
        df = _records_to_frame(records)
        if not records:
            df = pd.DataFrame({c: pd.Series([], dtype="str") for c in schema.required})
    else:
        df = batch
    df = _apply_columns(df, mapping, source)
    df = _adapt(df, schema, source)
    _check_required(df, schema, source)
    out, bad = _validate(df, schema, lambda i: f"{source}: batch row {i + 1}", skip_invalid,
                         json_lists=fmt in ("csv", "tsv"))
    errors.extend(bad)
    if errors:
        log.warning("%s: skipped %d invalid row(s) in a batch; first: %s", source,
                    len(errors), errors[0])
    return _to_arrow(out, schema)


def _to_arrow(df: pd.DataFrame, schema: Schema) -> Any:
    """A pyarrow Table with fixed types for our columns.

    Returning Arrow (not pandas) from Ray batches keeps every block's schema the
    same: a batch whose ``answers`` are all missing would otherwise become a
    null-typed column that Ray cannot combine with list-typed ones.
    """
    import pyarrow as pa

    types_ = {"str": pa.string(), "answers": pa.list_(pa.string()), "label": pa.float64()}
    arrays, names = [], []
    for col in df.columns:
        if col in schema.required:
            typ = pa.string()
        elif col in schema.optional:
            typ = types_[schema.optional[col]]
        else:
            typ = None
        values = df[col]
        try:
            arr = pa.array(values, type=typ, from_pandas=True)
        except (pa.ArrowException, TypeError, ValueError):
            if typ is not None:
                raise
            # Extra column of mixed types: keep it, as JSON text.
            arr = pa.array([None if _is_missing(v) else json.dumps(_jsonable(v), default=str)
                            for v in values.tolist()], type=pa.string())
        arrays.append(arr)
        names.append(str(col))
    return pa.Table.from_arrays(arrays, names=names)


def read_dataset(
    path: Any,
    kind: str,
    columns: Mapping[str, str] | str | None = None,
    skip_invalid: bool = False,
    fmt: str | None = None,
) -> ray.data.Dataset:
    """A lazily read, validated :class:`ray.data.Dataset` for large inputs.

    Files are listed like :func:`read_table` (directories of shards, URIs).
    Parquet uses ``ray.data.read_parquet``, CSV/TSV ``read_csv`` (every column read
    as a string, as :func:`read_table` does), JSON arrays ``read_json``.  JSONL is
    read with ``read_text`` and parsed per line here, because
    ``read_json(lines=True)`` goes through ``pandas.read_json``, which coerces
    numeric-looking strings (the prompt ``"0456"`` becomes the integer 456) and
    fails whole files on one broken line.  Each batch then gets the column mapping,
    the adapters and :func:`validate_frame`'s checks.  Problems with the path
    itself raise :class:`DataError` here; row problems surface when the dataset is
    executed, as Ray's ``RayTaskError``/``UserCodeException`` whose text holds the
    DataError message (row numbers count within a batch).  Skipped rows are logged
    by the workers.  Batches are returned as Arrow tables with fixed types for
    our columns, so blocks agree on their schema.
    """
    import ray.data

    schema = _schema(kind)
    mapping = parse_columns(columns)
    inputs = _list_inputs(path, _norm_fmt(fmt))
    fmts = sorted({i.fmt for i in inputs})
    shown = os.fspath(path)
    if len(fmts) > 1:
        raise DataError(f"{shown}: mixed formats ({', '.join(fmts)}); pass fmt= or split them")
    f = fmts[0]
    fs = inputs[0].fs
    paths = [i.path for i in inputs]
    if f == "parquet":
        ds = ray.data.read_parquet(paths, filesystem=fs, file_extensions=None)
    elif f in ("csv", "tsv"):
        import pyarrow as pa
        import pyarrow.csv as pacsv

        sep = "\t" if f == "tsv" else ","
        names: dict[str, None] = {}
        for inp in inputs[:16]:  # shards normally share one header
            names.update(dict.fromkeys(_csv_header(inp, sep)))
        ds = ray.data.read_csv(
            paths, filesystem=fs, file_extensions=None,
            parse_options=pacsv.ParseOptions(delimiter=sep, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in names},
                strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    elif f == "json":
        ds = ray.data.read_json(paths, filesystem=fs, file_extensions=None)
    else:
        ds = ray.data.read_text(paths, filesystem=fs, drop_empty_lines=True)
    fn = functools.partial(_ray_batch, kind=schema.kind, mapping=mapping,
                           skip_invalid=skip_invalid, fmt=f, source=shown)
    return ds.map_batches(fn, batch_format="pandas")
