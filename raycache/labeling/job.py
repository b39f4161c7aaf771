"""The labeling job: Ray Data streams the pairs through a teacher into resumable Parquet shards.

``run(cfg)``: read the pairs (sharded, streaming, validated by ``raycache.data.read_dataset``), drop
the pairs whose ``pair_id`` the output folder already holds, label the rest with the chosen teacher
and write them as ``part-<run>-<n>.parquet`` shards, each written to a hidden temporary file and
then moved into place, so the folder only ever holds complete shards. An interrupted run loses at
most the rows not yet in a shard; the next run with the same ``--out`` labels only what is missing.
Every row keeps its input columns and gets ``pair_id``, ``label`` (P(yes); NaN when it has none),
``teacher`` and ``error``. Progress (pairs/s, errors) is logged while the job runs; the summary is
returned, and the job fails (``ErrorRateExceeded``) when the error rate ends above
``max_error_rate``, or stops early once that outcome is certain.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raycache.config import LabelConfig
from raycache.data import DataError, read_dataset
from raycache.io import filesystem, fs_write_atomic
from raycache.labeling.backends import teacher_class

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    import pyarrow.fs as pafs
    import ray.data

logger = logging.getLogger(__name__)

SHARD_PREFIX = "part-"
PROGRESS_INTERVAL_S = 10.0
MAX_ERROR_EXAMPLES = 3


class ErrorRateExceeded(RuntimeError):
    """More rows than ``max_error_rate`` allows could not be labelled; the message has the counts."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


# --------------------------------------------------------------------------- output folder


class ShardStore:
    """The output folder (local path or pyarrow-filesystem URI) of labelled-pair Parquet shards."""

    def __init__(self, out: str):
        self.fs, self.root = filesystem(out)
        self.root = self.root.rstrip("/")
        self.shown = out
        self.fs.create_dir(self.root, recursive=True)

    def _files(self) -> list["pafs.FileInfo"]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))
        return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)

    def shard_paths(self) -> list[str]:
        """Complete shards, in name order."""
        return [i.path for i in self._files()
                if i.base_name.startswith(SHARD_PREFIX) and i.base_name.endswith(".parquet")]

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by a run that died while writing a shard."""
        stale = [i.path for i in self._files()
                 if i.base_name.startswith("." + SHARD_PREFIX) and i.base_name.endswith(".tmp")]
        for path in stale:
            self.fs.delete_file(path)
        return len(stale)

    def read_columns(self, path: str, columns: list[str]) -> "pa.Table":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path, columns=columns, filesystem=self.fs)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(
                f"{path}: unreadable shard in the output folder ({exc}); move it away and rerun "
                "(its pairs will be labelled again)") from None

    def labelled_pair_ids(self) -> "pa.Array":
        """pair_ids of every row already in the output (labelled or with an error)."""
        import pyarrow as pa

        chunks = [self.read_columns(p, ["pair_id"]).column("pair_id").combine_chunks()
                  for p in self.shard_paths()]
        return pa.concat_arrays(chunks) if chunks else pa.array([], type=pa.string())

    def drop_error_rows(self) -> int:
        """Rewrite each shard that has error rows without them (so they get labelled again)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        dropped = 0
        for path in self.shard_paths():
            errors = self.read_columns(path, ["error"]).column("error")
            if errors.null_count == len(errors):
                continue
            table = pq.read_table(path, filesystem=self.fs)
            kept = table.filter(pc.is_null(table.column("error")))
            dropped += table.num_rows - kept.num_rows
            if kept.num_rows:
                self.write(kept, os.path.basename(path))
            else:
                self.fs.delete_file(path)
        return dropped

    def write(self, table: "pa.Table", name: str) -> str:
        """Write ``table`` as shard ``name``: to a hidden temporary file, then moved into place."""
        import pyarrow.parquet as pq

        return fs_write_atomic(self.fs, f"{self.root}/{name}", lambda stream: pq.write_table(table, stream))


class ShardWriter:
    """Buffers labelled rows and writes them as shards of ``rows_per_shard`` rows."""

    def __init__(self, store: ShardStore, rows_per_shard: int):
        self.store = store
        self.rows_per_shard = rows_per_shard
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.buffer: list["pa.Table"] = []
        self.buffered_rows = 0
        self.shards_written = 0

    def add(self, table: "pa.Table") -> None:
        if table.num_rows:
            self.buffer.append(table)
            self.buffered_rows += table.num_rows
        while self.buffered_rows >= self.rows_per_shard:
            self._write(self.rows_per_shard)

    def flush(self) -> None:
        if self.buffered_rows:
            self._write(self.buffered_rows)

    def _write(self, rows: int) -> None:
        import pyarrow as pa

        table = pa.concat_tables(self.buffer, promote_options="permissive")
        shard, rest = table.slice(0, rows), table.slice(rows)
        name = f"{SHARD_PREFIX}{self.run_id}-{self.shards_written:05d}.parquet"
        self.store.write(shard, name)
        self.shards_written += 1
        self.buffer = [rest] if rest.num_rows else []
        self.buffered_rows = rest.num_rows


# --------------------------------------------------------------------------- progress


@dataclass
class LabelStats:
    """Counts over the rows labelled by this run."""

    labelled: int = 0
    errors: int = 0
    positives: int = 0
    label_sum: float = 0.0
    duplicates: int = 0
    error_messages: Counter = field(default_factory=Counter)

    @property
    def attempted(self) -> int:
        return self.labelled + self.errors

    def add(self, table: "pa.Table") -> None:
        import pyarrow.compute as pc

        errors = table.column("error")
        n_errors = table.num_rows - errors.null_count
        labels = table.column("label").filter(pc.is_null(errors))
        self.errors += n_errors
        self.labelled += len(labels)
        self.positives += int(pc.sum(pc.greater_equal(labels, 0.5)).as_py() or 0)
        self.label_sum += float(pc.sum(labels).as_py() or 0.0)
        if n_errors:
            for message in errors.drop_null().to_pylist():
                if message in self.error_messages or len(self.error_messages) < 50:
                    self.error_messages[message] += 1


class ProgressLog:
    """Logs pairs done (of ``total`` to label), pairs/s and errors at most every ``interval_s`` s."""

    def __init__(self, total: int, interval_s: float = PROGRESS_INTERVAL_S):
        self.total = total
        self.interval_s = interval_s
        self.start = time.perf_counter()
        self.last = self.start

    def update(self, stats: LabelStats, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.interval_s:
            return
        self.last = now
        rate = stats.attempted / max(now - self.start, 1e-9)
        logger.info("labelled %d/%d pairs, %.1f pairs/s, %d errors (%.1f%%)", stats.attempted,
                    self.total, rate, stats.errors, 100.0 * stats.errors / max(stats.attempted, 1))


# --------------------------------------------------------------------------- the job


@dataclass
class InputScan:
    """What one pass over the input tells before labeling starts."""

    pairs: int
    already_labelled: int
    columns: list[str]


def _scan_block(table: "pa.Table", done: "pa.Array") -> "pa.Table":
    """One summary row per input block: rows, rows already labelled, column names."""
    import pyarrow as pa
    import pyarrow.compute as pc

    already = pc.sum(pc.is_in(table.column("pair_id"), value_set=done)).as_py() if len(done) else 0
    return pa.table({"rows": [table.num_rows], "already": [already or 0],
                     "columns": [list(table.column_names)]})


def scan_input(pairs_ds: "ray.data.Dataset", done: "pa.Array") -> InputScan:
    """Count the input pairs and those already in the output, and list the columns, in one pass."""
    blocks = pairs_ds.map_batches(_scan_block, fn_kwargs={"done": done}, batch_size=None,
                                  batch_format="pyarrow").take_all()
    columns: dict[str, None] = {}
    for block in blocks:
        columns.update(dict.fromkeys(block["columns"]))
    return InputScan(pairs=sum(b["rows"] for b in blocks),
                     already_labelled=sum(b["already"] for b in blocks), columns=list(columns))


def _drop_labelled(table: "pa.Table", done: "pa.Array") -> "pa.Table":
    """Rows of ``table`` whose pair_id is not in ``done``."""
    import pyarrow.compute as pc

    return table.filter(pc.invert(pc.is_in(table.column("pair_id"), value_set=done)))


def _drop_repeats(table: "pa.Table", seen: set[str]) -> "pa.Table":
    """Rows whose pair_id this run has not written yet (the input may repeat a pair)."""
    import pyarrow as pa

    keep = []
    for pid in table.column("pair_id").to_pylist():
        keep.append(pid not in seen)
        seen.add(pid)
    return table if all(keep) else table.filter(pa.array(keep, type=pa.bool_()))


def summarize(cfg: LabelConfig, teacher: str, scan: InputScan, stats: LabelStats, shards: int,
              seconds: float) -> dict[str, Any]:
    """The job summary (JSON-serialisable)."""
    return {
        "out": cfg.out,
        "teacher": teacher,
        "pairs": scan.pairs,
        "already_labelled": scan.already_labelled,
        "labelled": stats.labelled,
        "errors": stats.errors,
        "duplicates": stats.duplicates,
        "error_rate": stats.errors / stats.attempted if stats.attempted else 0.0,
        "positive_rate": stats.positives / stats.labelled if stats.labelled else None,
        "mean_label": stats.label_sum / stats.labelled if stats.labelled else None,
        "shards_written": shards,
        "seconds": round(seconds, 3),
        "pairs_per_s": round(stats.attempted / seconds, 3) if seconds > 0 else None,
        "error_examples": [m for m, _ in stats.error_messages.most_common(MAX_ERROR_EXAMPLES)],
    }


def run(cfg: LabelConfig) -> dict[str, Any]:
    """Label ``cfg.pairs`` into ``cfg.out`` (resuming); returns the summary dict.

    Raises ConfigError / TeacherError before any work when the teacher can't run, DataError for
    unreadable input, and ErrorRateExceeded (after writing what was labelled) when too many rows
    could not be labelled.
    """
    import ray

    start = time.perf_counter()
    teacher_cls = teacher_class(cfg.teacher)
    teacher_cls.check_config(cfg)
    if not ray.is_initialized():
        ray.init()
    teacher_cls.check_cluster(cfg)

    store = ShardStore(cfg.out)
    if store.remove_stale_temporaries():
        logger.info("%s: removed temporary files of an interrupted run", cfg.out)
    if cfg.retry_errors:
        logger.info("%s: %d rows with errors will be labelled again", cfg.out, store.drop_error_rows())
    done = store.labelled_pair_ids()
    pairs_ds = read_dataset(cfg.pairs, "pairs", columns=cfg.read.columns,
                            skip_invalid=cfg.read.skip_invalid)
    scan = scan_input(pairs_ds, done)
    teacher_cls.check_columns(scan.columns)
    to_label = scan.pairs - scan.already_labelled
    logger.info("%s: %d pairs, %d of them already in %s; teacher %s", cfg.pairs, scan.pairs,
                scan.already_labelled, cfg.out, teacher_cls.display_name(cfg))

    todo = pairs_ds
    if len(done):
        todo = pairs_ds.map_batches(_drop_labelled, fn_kwargs={"done": done}, batch_format="pyarrow")
    # old label/teacher/error columns of the input are replaced by the teacher's
    labelled = teacher_cls.label_dataset(todo, cfg, scan.columns)

    writer = ShardWriter(store, cfg.rows_per_shard)
    stats = LabelStats()
    progress = ProgressLog(to_label)
    seen: set[str] = set()
    teacher = teacher_cls.display_name(cfg)
    certain_failure = False
    try:
        for table in labelled.iter_batches(batch_size=None, batch_format="pyarrow"):
            unique = _drop_repeats(table, seen)
            stats.duplicates += table.num_rows - unique.num_rows
            stats.add(unique)
            writer.add(unique)
            progress.update(stats)
            # The final rate is errors / attempted, attempted <= to_label: past this, it must fail.
            if stats.errors > cfg.max_error_rate * to_label:
                certain_failure = True
                break
    finally:
        writer.flush()
    seconds = time.perf_counter() - start
    progress.update(stats, force=True)
    summary = summarize(cfg, teacher, scan, stats, writer.shards_written, seconds)
    logger.info("label summary: %s", summary)
    if certain_failure or summary["error_rate"] > cfg.max_error_rate:
        stopped = " (stopped early: the limit could no longer be met)" if certain_failure else ""
        raise ErrorRateExceeded(
            f"{stats.errors} of {stats.attempted} pairs could not be labelled "
            f"({summary['error_rate']:.1%} > --max-error-rate {cfg.max_error_rate:g}){stopped}; "
            f"e.g. {summary['error_examples']}. Labelled rows are kept in {cfg.out}; fix the cause "
            "and rerun with --retry-errors to label the failed pairs again.",
            summary)
    return summary
