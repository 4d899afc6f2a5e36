"""A confusion-matrix PNG for classification runs (matplotlib, headless Agg backend)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from etils import epath

from ftjax.paths import as_path


def save_confusion_matrix(confusion: np.ndarray, label_names: Sequence[str], path: str | os.PathLike,
                          title: str = "") -> epath.Path:
    """Counts with row-normalised colours (rows = true labels, columns = predictions)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, np.float64)
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(cm)
    size = min(4 + 0.5 * n, 20)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true label")
    ax.set_xticks(range(n), labels=label_names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                        color="white" if rows[i, j] > 0.5 else "black", fontsize=8)
    ax.set_title(title or f"confusion matrix ({int(cm.sum())} examples)")
    fig.tight_layout()
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path


def save_figure(fig, path: epath.Path) -> None:
    """Save a matplotlib figure as PNG to a local path or a URL (matplotlib writes to a file object)."""
    import matplotlib.pyplot as plt

    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
