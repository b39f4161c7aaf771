"""One progress display on the driver: a bar (or, off a terminal, a line every few seconds) per stage.

The pipeline opens one :class:`Stage` at a time (``Display.stage``); library code anywhere in the
driver process reports to whichever stage is open through the module functions :func:`update` and
:func:`set_total` (no-ops when none is open, so ``raycache mine`` alone prints nothing new).

Ray workers (a Ray Train rank 0, an actor) report with :func:`report_line`: it sends the numbers to
the driver's display when one is listening (a named actor, polled by the display) and otherwise
prints one compact line to stdout, which Ray forwards to the driver when ``log_to_driver`` is on.

:func:`quiet` turns off Ray Data's status blocks and per-execution banners, transformers' weight
loading reports and bars, and the INFO chatter of Ray Serve and Ray Train (``--verbose`` keeps them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Any, Iterator, Optional

from tqdm import tqdm

SINK_NAME = "raycache-progress"
#: off a terminal, a running stage prints one line at most this often (seconds)
LINE_EVERY_S = 10.0
#: environment for Ray workers when quiet (inherited by a local cluster, sent in the runtime env)
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
    "RAY_SERVE_LOG_TO_STDERR": "0",  # Serve's INFO lines stay in its log files
}
_NOISY_LOGGERS = ("raycache", "ray", "ray.data", "ray.serve", "ray.train", "ray.tune", "ray.air", "transformers",
                  "httpx", "httpcore", "urllib3", "filelock", "faiss", "uvicorn", "fastapi")

_active: Optional["Stage"] = None
_lock = threading.Lock()


# ----------------------------------------------------------------------------- quiet mode


def quiet(verbose: bool = False) -> dict[str, str]:
    """Silence what a user need not read (unless ``verbose``); returns the env vars for workers."""
    import warnings

    if verbose:
        return {}
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers is a dependency
        pass
    try:
        import ray.data
        from ray.util.debug import log_once

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.enable_auto_log_stats = False
        ctx.execution_options.verbose_progress = False
        # Ray Data warns once that its bars are off: take that "once" now.
        log_once("ray_data_progress_manager_disabled")
    except Exception:  # pragma: no cover
        pass
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING if name != "transformers" else logging.ERROR)
        for handler in logger.handlers:  # Ray Data's own console handler
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(max(handler.level, logging.WARNING))
    return dict(QUIET_ENV)


# ----------------------------------------------------------------------------- module-level reporting


def update(n: int = 1, **fields: Any) -> None:
    """Advance the open stage by ``n`` units (and set its shown fields); nothing if none is open."""
    stage = _active
    if stage is not None:
        stage.update(n, **fields)


def set_total(total: Optional[int]) -> None:
    """Set the open stage's total (its ETA needs one); nothing if none is open."""
    stage = _active
    if stage is not None:
        stage.set_total(total)


def set_fields(**fields: Any) -> None:
    """Set fields shown on the open stage's line (None hides one); nothing if none is open."""
    stage = _active
    if stage is not None:
        stage.set_fields(**fields)


def next_part(done: float) -> None:
    """The open stage starts another job whose workers count from 0: earlier work counts ``done``."""
    stage = _active
    if stage is not None:
        with _lock:
            stage.offset, stage.reports = float(done), {}
        stage.set_done(done)


def set_done(done: float, **fields: Any) -> None:
    """Set the open stage's absolute progress; nothing if none is open."""
    stage = _active
    if stage is not None:
        stage.set_done(done, **fields)


def _format_fields(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key} {value}")
    return ", ".join(parts)


def format_line(stage: str, done: float, total: Optional[float], elapsed: Optional[float] = None,
                unit: str = "it", since_done: float = 0.0, **fields: Any) -> str:
    """``[stage] done/total unit (pct) · rate unit/s · ETA m:ss · field value, ...`` (one line).

    The rate is ``(done - since_done) / elapsed``: the units done in the ``elapsed`` seconds."""
    text = f"[{stage}] "
    text += f"{done:g}/{total:g} {unit}" if total else f"{done:g} {unit}"
    if total:
        text += f" ({100.0 * done / total:.0f}%)"
    if elapsed and elapsed > 0 and done > since_done:
        rate = (done - since_done) / elapsed
        text += f" · {rate:.1f} {unit}/s"
        if total and done < total:
            text += f" · ETA {tqdm.format_interval((total - done) / rate)}"
        elif total:
            text += f" · {tqdm.format_interval(elapsed)}"
    extra = _format_fields(fields)
    return text + (f" · {extra}" if extra else "")


_sink_handle: Any = None
_sink_checked_at = -1e9
_started: dict[str, tuple[float, float]] = {}  # stage -> (first report's time, its done)


def _find_sink():
    """The driver's progress actor, looked up at most every 30 s (None when there is none)."""
    global _sink_handle, _sink_checked_at
    if _sink_handle is not None:
        return _sink_handle
    now = time.monotonic()
    if now - _sink_checked_at < 30.0:
        return None
    _sink_checked_at = now
    try:
        import ray

        if ray.is_initialized():
            _sink_handle = ray.get_actor(SINK_NAME)
    except Exception:
        _sink_handle = None
    return _sink_handle


def report_line(stage: str, done: float, total: Optional[float] = None, **fields: Any) -> None:
    """Report progress from anywhere (a Ray Train rank 0, an actor, the driver).

    ``stage``: a short name ("train:bce"); ``done`` / ``total``: units so far / in all (for training:
    pairs seen over all epochs / pairs in all epochs); ``fields``: a few values to show
    (``loss=0.31, epoch=1``). When the pipeline's display is listening, the numbers go to its bar on
    the driver; otherwise one compact line is printed to stdout (Ray forwards worker stdout to the
    driver). Never raises.
    """
    try:
        unit = str(fields.pop("unit", "pairs"))
        sink = _find_sink()
        if sink is not None:
            try:
                sink.push.remote(stage, float(done), None if total is None else float(total), unit, fields)
                return
            except Exception:
                pass
        started, since_done = _started.setdefault(stage, (time.monotonic(), float(done)))
        print(format_line(stage, done, total, time.monotonic() - started, unit, since_done, **fields),
              flush=True)
    except Exception:  # progress must never break the work it reports on
        pass


class _Sink:
    """Named actor: keeps the latest report per stage for the driver's display to poll."""

    def __init__(self):
        self.latest: dict[str, tuple] = {}

    def push(self, stage: str, done: float, total: Optional[float], unit: str, fields: dict) -> None:
        self.latest[stage] = (done, total, unit, fields)

    def drain(self) -> dict[str, tuple]:
        out, self.latest = self.latest, {}
        return out


# ----------------------------------------------------------------------------- the display


class Stage:
    """One stage's bar: ``update``, ``set_total``, ``set_fields``; ``close`` prints its last line."""

    def __init__(self, display: "Display", name: str, label: str, unit: str, total: Optional[int]):
        self.display, self.name, self.label, self.unit = display, name, label, unit
        self.total = total
        self.done = 0.0
        self.fields: dict[str, Any] = {}
        self.started = time.monotonic()
        self.last_line = self.started  # off a terminal: the first line after LINE_EVERY_S
        self.closed = False
        self.note = ""  # appended to the closing line
        self.offset = 0.0  # added to worker reports (a stage that runs several jobs in turn)
        self.reports: dict[str, tuple] = {}
        self.bar = None
        if display.tty:
            self.bar = tqdm(total=total, desc=label, unit=unit, file=display.file, dynamic_ncols=True,
                            leave=True, mininterval=0.3, smoothing=0.1,
                            bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} {unit} "
                                       "[{elapsed}<{remaining}, {rate_fmt}]{postfix}"
                            if total else "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}]{postfix}")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _refresh(self, force: bool = False) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(_format_fields(self.fields), refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if force or now - self.last_line >= self.display.line_every_s:
            self.last_line = now
            self.display.write(format_line(self.label, self.done, self.total, self.elapsed, self.unit,
                                           **self.fields))

    def update(self, n: float = 1, **fields: Any) -> None:
        with _lock:
            self.done += n
            self.fields.update(fields)
            self.fields = {k: v for k, v in self.fields.items() if v is not None}
            if self.bar is not None:
                self.bar.update(n)
            self._refresh()

    def set_done(self, done: float, **fields: Any) -> None:
        """Absolute progress (reports from workers)."""
        self.update(done - self.done, **fields)

    def set_total(self, total: Optional[float]) -> None:
        with _lock:
            self.total = total
            if self.bar is not None:
                self.bar.total = total
                if total:
                    self.bar.bar_format = ("{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} {unit} "
                                           "[{elapsed}<{remaining}, {rate_fmt}]{postfix}")
                self.bar.refresh()

    def set_fields(self, **fields: Any) -> None:
        with _lock:
            self.fields.update(fields)
            self.fields = {k: v for k, v in self.fields.items() if v is not None}
            self._refresh()

    def close(self, note: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        with _lock:
            if self.bar is not None:
                self.bar.set_postfix_str(_format_fields(self.fields), refresh=False)
                self.bar.close()
                if note:
                    self.display.write(f"  {note}")
            else:
                line = format_line(self.label, self.done, self.total, self.elapsed, self.unit, **self.fields)
                self.display.write(line + (f" · {note}" if note else ""))


class Display:
    """The driver's display: one stage open at a time, worker reports polled from the sink actor."""

    def __init__(self, file=None, tty: Optional[bool] = None, enabled: bool = True,
                 line_every_s: float = LINE_EVERY_S):
        self.file = file or sys.stderr
        self.tty = bool(self.file.isatty()) if tty is None else tty
        self.enabled = enabled
        self.line_every_s = line_every_s
        self.sink = None
        self._poller: Optional[threading.Thread] = None
        self._stop = threading.Event()

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            tqdm.write(text, file=self.file)
        else:
            print(text, file=self.file, flush=True)

    # -- worker reports

    def listen(self) -> None:
        """Start the named sink actor (Ray must be initialised) and the thread that polls it."""
        import ray

        if self.sink is not None:
            return
        try:
            self.sink = ray.remote(num_cpus=0)(_Sink).options(name=SINK_NAME, get_if_exists=True).remote()
        except Exception:
            self.sink = None
            return
        self._stop.clear()
        self._poller = threading.Thread(target=self._poll, name="raycache-progress", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        import ray

        while not self._stop.wait(0.5):
            try:
                latest = ray.get(self.sink.drain.remote(), timeout=5)
            except Exception:
                continue
            stage = _active
            if stage is None or not latest:
                continue
            stage.reports.update(latest)  # one entry per reporter (e.g. each replay client)
            done = sum(r[0] for r in stage.reports.values())
            fields: dict = {}
            for r in stage.reports.values():
                fields.update(r[3])
            stage.set_done(stage.offset + done, **fields)

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=2)
            self._poller = None
        if self.sink is not None:
            try:
                import ray

                ray.kill(self.sink)
            except Exception:
                pass
            self.sink = None

    # -- stages

    @contextlib.contextmanager
    def stage(self, name: str, label: Optional[str] = None, unit: str = "it",
              total: Optional[int] = None) -> Iterator[Stage]:
        """Open a stage (the module's ``update`` / ``set_total`` report to it) until the block ends."""
        global _active
        if not self.enabled:
            stage = Stage(Display(file=open(os.devnull, "w"), tty=False, enabled=False), name,
                          label or name, unit, total)
        else:
            stage = Stage(self, name, label or name, unit, total)
        _active = stage
        try:
            yield stage
        finally:
            _active = None
            stage.close(stage.note)

    def table(self, headers: list[str], rows: list[list[Any]]) -> str:
        """A plain-text table (right-aligned numbers), written to the display and returned."""
        cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

        def fmt(row):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]]
        text = "\n".join(lines)
        self.write(text)
        return text
