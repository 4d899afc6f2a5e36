"""Metrics to the console (with progress and ETA), ``metrics.jsonl``, TensorBoard and (with
``config.log.wandb``) Weights & Biases, the last two under the log's own names (``train/loss``).

The log always matches the state the run holds: ``start(step)`` keeps the rows up to ``step``
(the restored checkpoint, 0 for a fresh start), moves the rows beyond it, written by a run that
died after its last checkpoint, to ``metrics.jsonl.stale-<run>`` (nothing is deleted), and makes
TensorBoard supersede its events beyond ``step`` (a purge event, as ``purge_step`` writes).
Every row carries the ``run`` id of the process that logged it. ``read_metrics`` is the one
reader of the log. Each row is in ``metrics.jsonl`` and the TensorBoard file (local or in the
bucket) before ``log`` returns, so a kill loses no row logged before the last checkpoint.

Only process 0 writes; other processes get a logger that does nothing. Each training process
is one W&B run (a resumed run is a new one with the same name and group, starting after its
checkpoint, like its rows in the log).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from etils import epath

import ml_collections

from ftjax.errors import require
from ftjax.paths import as_path, is_url, write_text_atomic

METRICS = "metrics.jsonl"


def run_id() -> str:
    """An id for this training process: its UTC start time and pid (rows, summaries, histories)."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _parse(line: str) -> dict | None:
    """A row of metrics.jsonl, or None for a line that is not one (e.g. cut short by a crash)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per logged step of ``workdir/metrics.jsonl``, in step order, train and eval keys
    merged, each with the ``run`` that logged it ([] when there is no log).

    A log written before logs were rewritten on resume can hold a step twice (a run that died
    after its last checkpoint, then the run that went on from it): the later row wins, since it
    belongs to the run whose state the workdir holds.
    """
    path = as_path(workdir) / METRICS
    if not path.exists():
        return []
    steps: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        row = _parse(line)
        if row is not None:
            steps.setdefault(row["step"], {}).update(row)
    return [steps[s] for s in sorted(steps)]


def wandb_options(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any] | None:
    """``wandb.init`` arguments from ``config.log`` (None when ``log.wandb`` is off): its project,
    entity, name (default: the workdir's name) and group, the whole config, and a local workdir as
    the folder of the run's files."""
    log = config.log
    if not log.wandb:
        return None
    path = as_path(workdir)
    return dict(project=log.wandb_project, entity=log.wandb_entity or None,
                name=log.wandb_name or path.name, group=log.wandb_group or None, job_type="train",
                config=json.loads(config.to_json_best_effort()),
                dir=None if is_url(workdir) else os.fspath(path))


class TensorBoardFile:
    """One TensorBoard event file under ``logdir`` (a folder or a gs:// URL), written in the
    caller's thread: ``flush()`` returns with every event added so far in the file or uploaded
    object. (tensorboardX's ``SummaryWriter`` hands events to a thread, so its ``flush`` can miss
    the newest ones, and a kill loses them.) ``purge_step`` hides the earlier files' events from
    that step on, as ``SummaryWriter(purge_step=...)`` does."""

    def __init__(self, logdir: str, purge_step: int):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.record_writer import directory_check

        directory_check(logdir)
        self._event = Event
        self._writer = EventsWriter(f"{logdir.rstrip('/')}/events")
        self._writer.write_event(Event(step=purge_step, wall_time=time.time(), file_version="brain.Event:2"))
        self._writer.write_event(Event(step=purge_step, wall_time=time.time(),
                                       session_log=SessionLog(status=SessionLog.START)))

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        from tensorboardX.summary import scalar

        for tag, value in scalars.items():
            self._writer.write_event(self._event(step=step, wall_time=time.time(), summary=scalar(tag, value)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a row, without ``step``: what TensorBoard and W&B plot."""
    return {k: v for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}


class MetricsLogger:
    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, tensorboard: bool = True,
                 wandb: dict[str, Any] | None = None, enabled: bool = True, stream=None,
                 run: str | None = None):
        """``wandb``: ``wandb.init`` arguments (``wandb_options``), or None for no W&B run."""
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.run = run or run_id()
        self.workdir: epath.Path = as_path(workdir)
        self.tensorboard = tensorboard
        self.start_time: float | None = None
        self.start_step = 0
        self._lines: list[str] = []
        self._tb = None
        self._wandb_options = wandb
        self._wandb = None

    def start(self, step: int) -> None:
        """Begin logging after ``step``: the log is cut back to it (the rest kept aside)."""
        self.start_time, self.start_step = time.time(), step
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / METRICS
        kept, stale = [], []
        for line in path.read_text().splitlines() if path.exists() else []:
            row = _parse(line)
            (kept if row is not None and row["step"] <= step else stale).append(line)
        if stale:
            write_text_atomic(self.workdir / f"{METRICS}.stale-{self.run}", "\n".join(stale) + "\n")
        self._lines = kept
        self._write()
        if self.tensorboard:  # events at steps > `step` in earlier event files are hidden
            self._tb = TensorBoardFile(os.fspath(self.workdir / "tensorboard"), purge_step=step + 1)
        if self._wandb_options is not None:
            wandb = require("wandb", "wandb", "config.log.wandb=True")
            config = {**self._wandb_options["config"], "ftjax_run": self.run}
            self._wandb = wandb.init(**{**self._wandb_options, "config": config})

    def _write(self) -> None:
        write_text_atomic(self.workdir / METRICS, "".join(line + "\n" for line in self._lines))

    def _append(self, line: str) -> None:
        """A local log gets the row appended (a half-written last line from a kill is set aside
        by the next ``start``); object stores have no append, so there the whole log is
        rewritten, atomically, on every row."""
        self._lines.append(line)
        if is_url(self.workdir):
            self._write()
        else:
            with (self.workdir / METRICS).open("a") as f:
                f.write(line + "\n")

    def log(self, step: int, metrics: dict[str, Any], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, **{f"{prefix}/{k}" if prefix else k: v for k, v in metrics.items()}}
        self._append(json.dumps({**row, "run": self.run}))
        if self._tb is not None:
            self._tb.add_scalars(_scalars(row), step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(_scalars(row), step=step)
        progress = ""
        if self.start_time is not None and prefix == "train":
            done = step - self.start_step
            elapsed = time.time() - self.start_time
            eta = elapsed / done * (self.total_steps - step) if done > 0 else float("inf")
            progress = f" [{100 * step / max(self.total_steps, 1):5.1f}% eta {_duration(eta)}]"
        body = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        print(f"[{prefix}] step {step}/{self.total_steps}{progress} {body}", file=self.stream, flush=True)

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
