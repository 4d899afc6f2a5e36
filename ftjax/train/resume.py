"""Resuming a workdir with a new config: compared with its ``config.json`` before anything runs.

Keys that change what the checkpoints hold (the model, the method and its ranks and targets, the
optimizer kind) or what their saved data position means (the data, batch size, seed) are
refused with every differing key, both values and a way out. Keys that only steer the rest of the
run (steps, learning-rate schedule, cadences, eval, mesh) may change; each resume appends a row to
``config_history.jsonl`` with the keys that changed.
"""

from __future__ import annotations

import json
import time
from typing import Any

import ml_collections
from etils import epath

from ftjax.paths import write_text_atomic
from ftjax.train.experiment import ConfigError

HISTORY = "config_history.jsonl"
# Keys (or sections, ending in '.') a resume may change.
MAY_CHANGE = (
    "train.steps", "train.learning_rate", "train.schedule", "train.warmup_steps",
    "train.min_lr_ratio", "train.weight_decay", "train.b1", "train.b2", "train.eps",
    "train.grad_clip", "train.grad_accum", "train.prefetch", "model.remat", "model.dtype",
    "model.allow_pickle",
    "method.lora.plus_ratio",  # LoRA+'s B learning-rate ratio, a learning rate like the others
    "data.cache_dir", "eval.", "log.", "checkpoint.", "incontext.", "mesh.", "distributed.",
)


class ResumeConfigError(ConfigError):
    """A resume whose config changes what the workdir's checkpoints hold."""


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def _has_checkpoints(workdir: epath.Path) -> bool:
    ckpts = workdir / "checkpoints"
    return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())


def changes(stored: dict, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """``key -> (stored value, new value)`` for every key whose value differs.

    Keys only one side has are skipped: they come from a different ftjax version, not from the
    user (a new key holds its default, which is what the old run ran with).
    """
    old, new = _flat(stored), _flat(json.loads(config.to_json_best_effort()))
    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}


def check(workdir: epath.Path, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]] | None:
    """The allowed changes of a resume (None when ``workdir`` holds no run to resume); refuses a
    shape- or data-changing one, before anything is built or written."""
    path = workdir / "config.json"
    if not (path.exists() and _has_checkpoints(workdir)):
        return None
    diff = changes(json.loads(path.read_text()), config)
    refused = {k: v for k, v in diff.items() if not _may_change(k)}
    if refused:
        listed = "; ".join(f"{k}: {old!r} in config.json, {new!r} now" for k, (old, new) in refused.items())
        raise ResumeConfigError(
            f"cannot resume {workdir} with this config: {listed} — these change what its "
            f"checkpoints hold or what their data position means; train in a new workdir "
            f"(with --config.model.init_from={workdir} to start from this run's weights) "
            f"or set the keys back")
    return diff


def record(workdir: epath.Path, step: int, run: str, diff: dict[str, tuple[Any, Any]]) -> None:
    """Append this resume (time, step, run, changed keys with old/new values) to config_history.jsonl."""
    path = workdir / HISTORY
    rows = path.read_text() if path.exists() else ""
    row = dict(time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), step=step, run=run,
               changed={k: {"old": old, "new": new} for k, (old, new) in diff.items()})
    write_text_atomic(path, rows + json.dumps(row) + "\n")
