"""k-shot fine-tuning vs in-context few-shot at the same k: the learning curve over k.

Fine-tuning arms are ordinary sweep arms (``data.kshot.k`` examples per label, one arm per
``data.kshot.draw``, grouped as ``finetune k=K``). In-context results come from
``ftjax.eval.incontext`` with ``incontext.k = K`` over the same template, verbalisers and k-shot
sampler (draws 0..incontext.draws-1). Both are summarised the same way (mean ± sample std over
draws) in a table and a plot of the metric against k.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Sequence

import jax
import ml_collections
from etils import epath

from ftjax.eval.plots import save_figure
from ftjax.experiments import report, stats
from ftjax.experiments.sweep import Arm
from ftjax.paths import as_path


def group(k: int) -> str:
    """The sweep group of the k-shot fine-tuning arms."""
    return f"finetune k={k}"


def run_incontext(config: ml_collections.ConfigDict, ks: Sequence[int], workdir: str | os.PathLike) -> dict[int, dict]:
    """In-context evaluation of ``config.model.source`` at every k (``DIR/incontext/k<K>.json``,
    reused when present)."""
    from ftjax.eval.incontext import evaluate_incontext, format_summary
    from ftjax.train.experiment import build

    out_dir = as_path(workdir) / "incontext"
    results, exp = {}, None
    for k in ks:
        path = out_dir / f"k{k}.json"
        if not path.exists():
            exp = exp or build(config)
            c = copy.deepcopy(config)
            c.incontext.k = int(k)
            result = evaluate_incontext(exp.model, exp.tokenizer, c, exp.mesh)
            if jax.process_index() == 0:
                out_dir.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result, indent=2))
                print(format_summary(result), flush=True)
        results[k] = json.loads(path.read_text())
    return results


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    s = stats.summarize(values)
    return f"{s.mean:.4f} ± {s.std:.4f} (n={s.n})"


def learning_curve(workdir: str | os.PathLike, arms: list[Arm], ks: Sequence[int], incontext: dict[int, dict],
                   metric: str = "accuracy") -> tuple[epath.Path, str]:
    """``fewshot.md`` (a row per k) and ``learning_curve.png`` (metric vs k, ± std)."""
    workdir = as_path(workdir)
    rows = report.collect(workdir, arms, metric)
    curves: dict[str, dict[int, list[float]]] = {"fine-tuned": {}, "in-context": {}, "in-context, calibrated": {}}
    for k in ks:
        curves["fine-tuned"][k] = [r["value"] for r in rows
                                   if r["group"] == group(k) and r["status"] == "done" and r["value"] is not None]
        draws = incontext.get(k, {}).get("draws", [])
        curves["in-context"][k] = [d["metrics"][metric] for d in draws]
        curves["in-context, calibrated"][k] = [d["metrics"]["calibrated"][metric] for d in draws
                                               if "calibrated" in d["metrics"]]
    curves = {name: c for name, c in curves.items() if any(c.values())}
    lines = [f"# Few-shot: k-shot fine-tuning vs in-context ({metric}, mean ± std over draws)", "",
             "| k per label | " + " | ".join(curves) + " |", "|" + "---|" * (len(curves) + 1)]
    lines += [f"| {k} | " + " | ".join(_cell(c[k]) for c in curves.values()) + " |" for k in ks]
    _plot(curves, ks, metric, workdir / "learning_curve.png")
    text = "\n".join(lines) + "\n\n![learning curve](learning_curve.png)\n"
    (workdir / "fewshot.md").write_text(text)
    return workdir / "fewshot.md", text


def _plot(curves: dict[str, dict[int, list[float]]], ks: Sequence[int], metric: str, path: epath.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        points = [(k, stats.summarize(v)) for k, v in curve.items() if v]
        ax.errorbar([k for k, _ in points], [s.mean for _, s in points], yerr=[s.std for _, s in points],
                    marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ks), [str(k) for k in ks])
    ax.set_xlabel("examples per label (k)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
