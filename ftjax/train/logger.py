"""Metrics to the console (with progress and ETA), ``metrics.jsonl`` and TensorBoard.

Only process 0 writes; other processes get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


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


class MetricsLogger:
    def __init__(self, workdir: str | Path, *, total_steps: int, tensorboard: bool = True,
                 enabled: bool = True, stream=None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.start_time: float | None = None
        self.start_step = 0
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def start(self, step: int) -> None:
        self.start_time, self.start_step = time.time(), step

    def log(self, step: int, metrics: dict[str, Any], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, **{f"{prefix}/{k}" if prefix else k: v for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
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
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
