"""Classification and language-model metrics, finished on host from on-device sums.

The device accumulates a confusion matrix (``confusion[true, pred]``) or sums of NLL and counts;
these functions turn them into numbers once, at the end of an eval pass.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def classification_metrics(confusion: np.ndarray, label_names: Sequence[str] | None = None) -> dict:
    """Accuracy, precision/recall/F1 (macro, micro, weighted, per class) from ``confusion[true, pred]``.

    Conventions follow scikit-learn with ``zero_division=0``: a class never predicted has
    precision 0; a class absent from the labels has recall 0.
    """
    cm = np.asarray(confusion, np.float64)
    n = cm.shape[0]
    names = list(label_names) if label_names is not None else [str(i) for i in range(n)]
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = cm.sum()
    micro_p = float(tp.sum() / predicted.sum()) if predicted.sum() else 0.0
    micro_r = float(tp.sum() / support.sum()) if support.sum() else 0.0
    micro_f1 = 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0
    weights = support / support.sum() if support.sum() else np.zeros(n)
    return {
        "num_examples": int(total),
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "precision_micro": micro_p,
        "recall_micro": micro_r,
        "f1_micro": micro_f1,
        "precision_weighted": float((precision * weights).sum()),
        "recall_weighted": float((recall * weights).sum()),
        "f1_weighted": float((f1 * weights).sum()),
        "per_class": [
            {"label": names[i], "precision": float(precision[i]), "recall": float(recall[i]),
             "f1": float(f1[i]), "support": int(support[i])}
            for i in range(n)
        ],
        "confusion_matrix": cm.astype(np.int64).tolist(),
    }


def lm_metrics(nll_sum: float, tokens: float, num_bytes: float | None = None) -> dict:
    """Mean loss, perplexity and (when the byte count is known) bits per byte."""
    loss = nll_sum / tokens if tokens else float("nan")
    out = {"loss": float(loss), "perplexity": float(math.exp(min(loss, 700))), "tokens": int(tokens)}
    if num_bytes:
        out["bits_per_byte"] = float(nll_sum / num_bytes / math.log(2))
    return out


def format_table(metrics: dict) -> str:
    """A readable console table of the scalar metrics and the per-class rows."""
    lines = [f"{k:>20s}  {v:.4f}" if isinstance(v, float) else f"{k:>20s}  {v}"
             for k, v in metrics.items() if isinstance(v, (int, float))]
    for key, header in (("per_class", "label"), ("entity_per_type", "entity")):
        if key not in metrics:
            continue
        lines.append(f"{header:>20s}  {'prec':>6s} {'rec':>6s} {'f1':>6s} {'support':>7s}")
        for row in metrics[key]:
            lines.append(f"{row['label']:>20s}  {row['precision']:6.3f} {row['recall']:6.3f} "
                         f"{row['f1']:6.3f} {row['support']:7d}")
    return "\n".join(lines)
