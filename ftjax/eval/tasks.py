"""Per-task evaluation of a multi-task mixture.

Eval batches run through the tasks in order, so a task's pass only touches its own batches (and
the one shared at a boundary, with the other task's rows masked out). A classification task's
metrics come from its own block of the label space (``label_offsets``), so macro averages count
only its labels.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ftjax.eval import metrics as metrics_lib

SCALARS = ("accuracy", "f1_macro", "f1_micro", "loss", "perplexity")


def only_task(batches: Iterable[dict[str, np.ndarray]], task: int) -> Iterator[dict[str, np.ndarray]]:
    """The rows of ``task`` (others get ``example_mask`` 0); batches without any are skipped."""
    for batch in batches:
        keep = (batch["task_id"] == task) & (batch["example_mask"] > 0)
        if keep.any():
            yield dict(batch, example_mask=keep.astype(batch["example_mask"].dtype))


def task_metrics(metrics: dict, lo: int, hi: int, label_names: list[str]) -> dict:
    """Metrics of one task's pass, with classification metrics cut to its labels ``lo:hi``."""
    if "confusion_matrix" not in metrics:
        return metrics
    cm = np.asarray(metrics["confusion_matrix"], np.float64)
    out = metrics_lib.classification_metrics(cm[lo:hi, lo:hi], label_names[lo:hi])
    out["loss"] = metrics["loss"]
    return out


def evaluate(evaluator: Any, params: Any, frozen: Any, pipe: Any, batch_size: int,
             max_batches: int = 0) -> dict:
    """The eval split's metrics; for a mixture also each task's, under ``tasks`` and as flat
    ``"<task>/<metric>"`` scalars (loggable, and usable as ``config.eval.best_metric``)."""
    return evaluate_many(lambda batches: [evaluator.run(params, frozen, batches, max_batches=max_batches)],
                         pipe, batch_size)[0]


def evaluate_many(run: Callable[[Iterable[dict[str, np.ndarray]]], list[dict]], pipe: Any,
                  batch_size: int) -> list[dict]:
    """``evaluate`` for several models scored by one pass: ``run(batches)`` gives each one's
    metrics (e.g. ``Evaluator.run_arms``)."""
    outs = run(pipe.eval_batches(batch_size))
    info = pipe.info
    if info.num_tasks < 2:
        return outs
    for out in outs:
        out["tasks"] = {}
    for t, name in enumerate(info.task_names):
        for out, m in zip(outs, run(only_task(pipe.eval_batches(batch_size), t))):
            m = task_metrics(m, info.label_offsets[t], info.label_offsets[t + 1], info.label_names)
            out["tasks"][name] = m
            out.update({f"{name}/{k}": m[k] for k in SCALARS if k in m})
    return outs


def host_train_metrics(metrics: dict, task_names: list[str]) -> dict[str, float]:
    """Train-step metrics as floats; per-task vectors become ``"<task>/<metric>"`` for the tasks
    present in the step's batch."""
    out = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
    if "task_weight" in metrics:
        for t, name in enumerate(task_names):
            if metrics["task_weight"][t] > 0:
                out[f"{name}/loss"] = float(metrics["task_loss"][t])
                out[f"{name}/accuracy"] = float(metrics["task_accuracy"][t])
    return out
