"""Continual-learning numbers from an accuracy matrix, and their table and heat map.

``R[i, j]`` is the accuracy on task ``j`` after training stage ``i`` (stage ``i`` trains task
``i``); ``b[j]`` is the accuracy on task ``j`` of the model the sequence starts from. With ``T``
tasks (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory"):

* ACC = mean_j R[T-1, j]
* BWT = mean_{j < T-1} (R[T-1, j] - R[j, j])          (negative = forgetting)
* FWT = mean_{j > 0} (R[j-1, j] - b[j])               (what earlier stages did for task j)

and forgetting (Chaudhry et al. 2018) = mean_{j < T-1} (max_{l < T-1} R[l, j] - R[T-1, j]).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def transfer_metrics(R: np.ndarray, b: Sequence[float]) -> dict[str, float]:
    """ACC, BWT, FWT and forgetting of a ``T x T`` accuracy matrix (BWT/FWT/forgetting need T >= 2)."""
    R, b = np.asarray(R, np.float64), np.asarray(b, np.float64)
    t = R.shape[0]
    if R.shape != (t, t) or b.shape != (t,):
        raise ValueError(f"R must be T x T and b length T; got R {R.shape}, b {b.shape}")
    out = {"acc": float(R[-1].mean())}
    if t < 2:
        return out
    out["bwt"] = float(np.mean([R[-1, j] - R[j, j] for j in range(t - 1)]))
    out["fwt"] = float(np.mean([R[j - 1, j] - b[j] for j in range(1, t)]))
    out["forgetting"] = float(np.mean([R[:-1, j].max() - R[-1, j] for j in range(t - 1)]))
    return out


def markdown(R: np.ndarray, b: Sequence[float], tasks: Sequence[str], metrics: dict[str, float],
             metric: str = "accuracy") -> str:
    """The matrix (rows: after each stage; the first row is the starting model) and the summary."""
    head = f"| {metric} | " + " | ".join(tasks) + " |"
    lines = [head, "|" + "---|" * (len(tasks) + 1), "| start (b) | " + " | ".join(f"{x:.4f}" for x in b) + " |"]
    for i, task in enumerate(tasks):
        lines.append(f"| after {i + 1}: {task} | " + " | ".join(f"{x:.4f}" for x in R[i]) + " |")
    lines += ["", "| " + " | ".join(k.upper() for k in metrics) + " |", "|" + "---|" * len(metrics),
              "| " + " | ".join(f"{v:.4f}" if k == "acc" else f"{v:+.4f}" for k, v in metrics.items()) + " |"]
    return "\n".join(lines)


def heatmap(R: np.ndarray, tasks: Sequence[str], path: str | Path, title: str = "") -> Path:
    """A PNG of ``R`` with every cell annotated."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = np.asarray(R, np.float64)
    size = 1.2 + 1.1 * len(tasks)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), [f"after {i + 1}: {t}" for i, t in enumerate(tasks)])
    ax.set_xlabel("evaluated on")
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            ax.text(j, i, f"{R[i, j]:.3f}", ha="center", va="center",
                    color="black" if R[i, j] > 0.6 else "white")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or "accuracy after each stage")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
