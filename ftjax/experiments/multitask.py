"""Multi-task vs single-task runs of the same budget: per-task tables over seeds.

Arms come from a config's ``sweep()``; an arm's ``group`` says what it trained: ``multi-task``
(the whole mixture) or ``<task> only`` (the mixture with every other task at weight 0, so the
label space, the eval and the metric names are the same). Each task's table compares the
multi-task arms with that task's single-task arms on ``<task>/<metric>``, with the sweep
report's statistics (mean ± std, bootstrap CI, paired test over shared seeds).
"""

from __future__ import annotations

import os

from etils import epath

from ftjax.experiments import report
from ftjax.experiments.sweep import Arm
from ftjax.paths import as_path
from ftjax.train.logger import read_metrics

MULTI = "multi-task"


def single(task: str) -> str:
    """The group name of a task's single-task arms."""
    return f"{task} only"


def per_task_best(workdir: str | os.PathLike, tasks: list[str], metric: str = "accuracy",
                  higher_is_better: bool = True) -> dict[str, dict[str, float]]:
    """Each task's best eval ``metric`` over a run's evaluations, with its step (metrics.jsonl,
    one value per step: ``read_metrics``)."""
    best: dict[str, dict[str, float]] = {}
    for row in read_metrics(workdir):
        for task in tasks:
            value = row.get(f"eval/{task}/{metric}")
            if value is None:
                continue
            old = best.get(task)
            if old is None or (value > old["value"] if higher_is_better else value < old["value"]):
                best[task] = {"value": value, "step": row["step"]}
    return best


def write_report(workdir: str | os.PathLike, arms: list[Arm], tasks: list[str], metric: str = "accuracy",
                 higher_is_better: bool = True) -> tuple[epath.Path, str]:
    """``tasks.md``: per task, multi-task vs single-task arms; then the multi-task arms' per-task
    best evaluation (value @ step)."""
    workdir = as_path(workdir)
    parts = [f"# Multi-task vs single-task ({metric})"]
    for task in tasks:
        chosen = [a for a in arms if a.group in (MULTI, single(task))]
        rows = report.collect(workdir, chosen, f"{task}/{metric}")
        parts.append(report.markdown(rows, f"{task}/{metric}", higher_is_better))
    lines = ["## Multi-task arms: best evaluation per task", "",
             "| arm | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for arm in arms:
        run = workdir / "arms" / arm.name
        if arm.group == MULTI and (run / "metrics.jsonl").exists():
            best = per_task_best(run, tasks, metric, higher_is_better)
            lines.append(f"| {arm.name} | " + " | ".join(
                f"{best[t]['value']:.4f} @ {best[t]['step']}" if t in best else "-" for t in tasks) + " |")
    parts.append("\n".join(lines))
    text = "\n\n".join(parts) + "\n"
    (workdir / "tasks.md").write_text(text)
    return workdir / "tasks.md", text
