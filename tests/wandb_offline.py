"""W&B in tests: offline (nothing leaves this machine, no login, no error reports), every file
under one folder; a run is read back with wandb's own reader of its ``.wandb`` log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def offline_env(root: Path) -> dict[str, str]:
    """Environment variables that keep wandb offline, quiet and inside ``root``."""
    return dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_ERROR_REPORTING="false",
                WANDB_DISABLE_GIT="true", WANDB_DIR=str(root), WANDB_CONFIG_DIR=str(root / "config"),
                WANDB_CACHE_DIR=str(root / "cache"), WANDB_DATA_DIR=str(root / "data"))


def read_run(run_dir: Path) -> tuple[dict, dict[int, dict]]:
    """The run record (project, name, group, config) and ``{step: metrics}`` of an offline run
    (a ``wandb/offline-run-*`` folder), from ``wandb leet inspect --json``."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "WANDB_SILENT": "true"}).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    run = next(r["run"] for r in records if r["type"] == "run")
    history: dict[int, dict] = {}
    for r in records:
        if r["type"] == "history":
            item = r["history"]["item"]
            history.setdefault(item["_step"], {}).update(
                {k: v for k, v in item.items() if not k.startswith("_")})
    return run, history


def offline_runs(workdir: Path) -> list[Path]:
    """The offline W&B runs a training workdir holds, oldest first."""
    return sorted((workdir / "wandb").glob("offline-run-*"))
