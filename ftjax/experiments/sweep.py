"""Run every arm of a config file's ``sweep()``: resumable, failure-tolerant, compile-cached.

``sweep()`` returns a list of dicts of dotted config overrides; an optional ``name`` names the
arm and an optional ``group`` says which arms are seeds of one method (default: the overrides
without ``train.seed``). Each arm is ``scripts/train.py`` in its own process and workdir
(``DIR/arms/NAME``), so a crash or OOM stays in its arm. A finished arm (its
``run_summary.json`` exists) is not run again; a killed sweep continues where it stopped; a
failing arm is recorded with its error and the others go on. All arms share a persistent XLA
compilation cache: arms that differ only in traced values (learning rate, weight decay, seed)
compile to the same program and skip the compile.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "scripts" / "train.py"
SEED_KEY = "train.seed"


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    group: str
    seed: int | None
    overrides: dict[str, Any]


def load_config_module(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"ftjax_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _slug(overrides: dict[str, Any]) -> str:
    text = ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())
    return re.sub(r"[^A-Za-z0-9=,._-]+", "_", text) or "default"


def expand_arms(entries: list[dict[str, Any]]) -> list[Arm]:
    """Arms from ``sweep()`` entries, with unique names."""
    arms, seen = [], set()
    for entry in entries:
        entry = dict(entry)
        name, group = entry.pop("name", None), entry.pop("group", None)
        seed = entry.get(SEED_KEY)
        group = group or _slug({k: v for k, v in entry.items() if k != SEED_KEY})
        name = name or _slug(entry)
        if name in seen:
            raise ValueError(f"sweep arm name {name!r} appears twice; give arms distinct names")
        seen.add(name)
        arms.append(Arm(name=name, group=group, seed=seed, overrides=entry))
    return arms


def arm_command(config_arg: str, arm: Arm, workdir: Path) -> list[str]:
    flags = [f"--config.{k}={v}" for k, v in arm.overrides.items()]
    return [sys.executable, str(TRAIN_SCRIPT), f"--config={config_arg}", f"--workdir={workdir}", *flags]


def arm_status(arm_dir: Path) -> str:
    if (arm_dir / "run_summary.json").exists():
        return "done"
    if (arm_dir / "error.txt").exists():
        return "failed"
    return "pending"


class SweepRunner:
    """Runs arms (``parallel`` at a time) and streams their progress with an arm prefix."""

    def __init__(self, config_arg: str, workdir: str | Path, *, parallel: int = 1,
                 echo: Callable[[str], None] = print, retry_failed: bool = False):
        self.config_arg, self.workdir = config_arg, Path(workdir)
        self.parallel, self.echo, self.retry_failed = max(1, parallel), echo, retry_failed
        self._lock = threading.Lock()

    def env(self) -> dict[str, str]:
        cache = self.workdir / "xla_cache"
        return dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(cache),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

    def run_arm(self, arm: Arm) -> str:
        arm_dir = self.workdir / "arms" / arm.name
        status = arm_status(arm_dir)
        if status == "done" or (status == "failed" and not self.retry_failed):
            self._say(arm, f"{status}, skipped")
            return status
        arm_dir.mkdir(parents=True, exist_ok=True)
        (arm_dir / "error.txt").unlink(missing_ok=True)
        (arm_dir / "arm.json").write_text(json.dumps(dataclasses.asdict(arm), indent=2))
        self._say(arm, "starting")
        start = time.time()
        proc = subprocess.Popen(arm_command(self.config_arg, arm, arm_dir), env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-60:]
            if line.startswith(("[train]", "[eval]", "first step", "resumed", "mesh", "SIGTERM")):
                self._say(arm, line)
        code = proc.wait()
        if code != 0 or not (arm_dir / "run_summary.json").exists():
            (arm_dir / "error.txt").write_text(f"exit code {code}\n" + "\n".join(tail))
            self._say(arm, f"FAILED (exit {code}); see {arm_dir / 'error.txt'}")
            return "failed"
        self._say(arm, f"done in {time.time() - start:.0f}s")
        return "done"

    def run(self, arms: list[Arm]) -> dict[str, str]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "sweep.json").write_text(json.dumps(
            {"config": self.config_arg, "arms": [dataclasses.asdict(a) for a in arms]}, indent=2))
        with concurrent.futures.ThreadPoolExecutor(self.parallel) as pool:
            return dict(zip([a.name for a in arms], pool.map(self.run_arm, arms)))

    def _say(self, arm: Arm, message: str) -> None:
        with self._lock:
            self.echo(f"[{arm.name}] {message}")
