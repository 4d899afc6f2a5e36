"""Sequential fine-tuning: one task after another, each stage starting from the last one's weights.

``config.data.mixture.tasks`` names every task of the sequence; ``config.stages`` orders them:
``[{"task": NAME, "steps": N, "replay": r, "overrides": {"dotted.key": value}}, ...]``. Every
stage is an ordinary ``train()`` run in ``DIR/stage_<i>_<task>`` whose data is the whole mixture
with explicit weights: ``1 - r`` for the stage's task and ``r`` shared by the earlier tasks
(rehearsal on their training rows), 0 for later ones. So every stage sees the same label space
(one head over the union of labels; each task's rows only score their own task's labels, i.e.
one head per task) and evaluates every task, giving the row ``R[i]`` of the accuracy matrix.
Stage ``i + 1`` starts from stage ``i`` through ``model.init_from``. ``config.regularizer``
(L2-SP / EWC) applies from the second stage on, anchored at the previous stage's weights; EWC's
Fisher is estimated on the earlier tasks. Stages already finished are not run again.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from ftjax.eval import tasks as eval_tasks
from ftjax.eval.loop import Evaluator
from ftjax.experiments import transfer
from ftjax.paths import as_path
from ftjax.train.experiment import build
from ftjax.train.loop import train

STAGE_KEYS = ("task", "steps", "replay", "overrides")


def _stages(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    tasks = list(config.data.mixture.tasks)
    stages = [dict(s) for s in config.stages]
    if not stages:
        raise ValueError("config.stages is empty")
    for i, s in enumerate(stages):
        unknown = sorted(set(s) - set(STAGE_KEYS))
        if unknown:
            raise ValueError(f"config.stages[{i}] has unknown keys {unknown}; use {STAGE_KEYS}")
        if s.get("task") not in tasks:
            raise ValueError(f"config.stages[{i}].task={s.get('task')!r} is not a task of "
                             f"config.data.mixture.tasks {tasks}")
        if not 0.0 <= float(s.get("replay", 0.0)) < 1.0:
            raise ValueError(f"config.stages[{i}].replay={s['replay']} must be in [0, 1)")
    order = [s["task"] for s in stages]
    if len(set(order)) != len(order):
        raise ValueError(f"config.stages repeats a task ({order}); each task is one stage")
    return stages


def stage_dir(workdir: epath.Path, i: int, task: str) -> epath.Path:
    return workdir / f"stage_{i + 1}_{task}"


def stage_configs(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                  ) -> list[tuple[epath.Path, ml_collections.ConfigDict]]:
    """(workdir, train config) of every stage, in order."""
    workdir = as_path(workdir)
    stages = _stages(config)
    order = [s["task"] for s in stages]
    base = copy.deepcopy(config)
    with base.unlocked():
        del base["stages"]
    out = []
    for i, s in enumerate(stages):
        c = copy.deepcopy(base)
        replay = float(s.get("replay", 0.0)) if i else 0.0
        with c.unlocked():
            c.data.mixture.weighting = "explicit"
            c.data.mixture.weights = {t: 0.0 for t in c.data.mixture.tasks}
            c.data.mixture.weights[s["task"]] = 1.0 - replay
            for t in order[:i]:
                c.data.mixture.weights[t] = replay / i
        c.train.steps = int(s.get("steps", c.train.steps))
        if i:
            c.model.init_from = str(out[-1][0])
            if c.regularizer.kind == "ewc" and not c.regularizer.fisher_tasks:
                c.regularizer.fisher_tasks = order[:i]
        else:
            c.regularizer.kind = "none"
        c.update_from_flattened_dict(dict(s.get("overrides", {})))
        out.append((stage_dir(workdir, i, s["task"]), c))
    return out


def _finished(run: epath.Path, steps: int) -> dict | None:
    path = run / "eval" / "metrics.json"
    if path.exists():
        metrics = json.loads(path.read_text())
        if metrics.get("step") == steps:
            return metrics
    return None


def evaluate_start(config: ml_collections.ConfigDict, out: epath.Path) -> dict:
    """Per-task metrics of the model the sequence starts from (``b`` of forward transfer)."""
    path = out / "eval" / "metrics.json"
    if path.exists():
        return json.loads(path.read_text())
    exp = build(config)
    metrics = eval_tasks.evaluate(Evaluator.for_experiment(exp), exp.params, exp.frozen, exp.pipe,
                                  config.eval.batch_size, config.eval.max_batches)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"step": 0, **metrics}, indent=2))
    return metrics


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, metric: str = "accuracy") -> dict:
    """Train every stage (skipping finished ones), then write the accuracy matrix, its transfer
    numbers, ``report.md``, ``sequential.json`` and ``accuracy_matrix.png`` to ``workdir``."""
    workdir = as_path(workdir)
    stages = stage_configs(config, workdir)
    tasks = [s["task"] for s in _stages(config)]
    start = evaluate_start(stages[0][1], workdir / "start")
    rows = []
    for i, (run_dir, c) in enumerate(stages):
        print(f"stage {i + 1}/{len(stages)}: {tasks[i]} ({c.train.steps} steps) -> {run_dir}", flush=True)
        metrics = _finished(run_dir, c.train.steps) or train(c, run_dir)
        rows.append([metrics[f"{t}/{metric}"] for t in tasks])
    R = np.asarray(rows)
    b = [start[f"{t}/{metric}"] for t in tasks]
    numbers = transfer.transfer_metrics(R, b)
    table = transfer.markdown(R, b, tasks, numbers, metric)
    result = {"tasks": tasks, "metric": metric, "R": R.tolist(), "b": b, **numbers,
              "stages": [str(d) for d, _ in stages]}
    if jax.process_index() == 0:
        (workdir / "sequential.json").write_text(json.dumps(result, indent=2))
        (workdir / "report.md").write_text(f"# Sequential fine-tuning\n\n{table}\n")
        transfer.heatmap(R, tasks, workdir / "accuracy_matrix.png", title=f"{metric} after each stage")
        print(f"\n{table}\n\nreport: {workdir / 'report.md'}", flush=True)
    return result
