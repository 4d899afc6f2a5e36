"""k-shot fine-tuning vs in-context few-shot at the same k: the learning curve over k.

Fine-tuning arms are ordinary sweep arms (``data.kshot.k`` examples per label, one arm per
``data.kshot.draw``, grouped as ``finetune k=K``); the same arms from meta-learned weights
(``ftjax.experiments.meta``, ``model.init_from``) are grouped as ``meta-finetune k=K``.
In-context results come from ``ftjax.eval.incontext`` with ``incontext.k = K`` over the same
template, verbalisers and k-shot sampler (draws 0..incontext.draws-1). All are summarised the
same way (mean ± sample std and 95% bootstrap CI over draws) in a table and a plot of the metric
against k.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Sequence

import jax
import ml_collections
from etils import epath

from ftjax.eval.plots import save_figure
from ftjax.experiments import report, stats, sweep
from ftjax.experiments.sweep import Arm
from ftjax.paths import as_path


def group(k: int) -> str:
    """The sweep group of the k-shot fine-tuning arms."""
    return f"finetune k={k}"


def run_in_process(config_arg: str, arms: list[Arm], workdir: str | os.PathLike) -> None:
    """Train every arm not yet done in this process, one after another (no process start,
    import and model load per arm; an arm's error is raised)."""
    from ftjax.train.fused_plan import with_overrides
    from ftjax.train.loop import train

    path, _, arg = config_arg.partition(":")
    base = sweep.load_config_module(path).get_config(arg or None)
    sweep.write_manifest(workdir, config_arg, arms)
    for arm in arms:
        arm_dir = sweep.arm_dir(workdir, arm)
        if sweep.arm_status(arm_dir) == "done":
            print(f"[{arm.name}] done, skipped", flush=True)
            continue
        print(f"[{arm.name}] training in this process", flush=True)
        train(with_overrides(base, arm.overrides), arm_dir)


def run_study(config_arg: str, workdir: str | os.PathLike, *, meta: bool = True, in_process: bool = False,
              parallel: int = 1) -> tuple[epath.Path, str]:
    """The whole study of a config with ``sweep()`` and ``ks()``: meta-training (``config.meta``,
    into ``DIR/meta-<algorithm>``), the arms from the pretrained and (``meta``) from the meta-learned model,
    the sweep report, in-context evaluations (text_to_text only: an encoder classifier has none)
    and the learning curve. Finished parts are reused."""
    from ftjax.experiments import launchers, meta as meta_lib

    path, _, arg = config_arg.partition(":")
    module = sweep.load_config_module(path)
    arg = arg or None
    config, ks = module.get_config(arg), module.ks(arg)
    arms = sweep.expand_arms(module.sweep(arg))
    algorithms = []
    if meta:
        if "meta" not in config:
            raise meta_lib.MetaConfigError(f"{path} has no config.meta section (meta.meta_config()); "
                                           "add one or run with --meta=false")
        algorithms = [config.meta.algorithm] + [  # and those an earlier study in workdir ran
            a for a in meta_lib.ALGORITHMS if a != config.meta.algorithm
            and (meta_lib.meta_dir(workdir, a) / meta_lib.SUMMARY).exists()]
    base_arms = list(arms)
    for algorithm in algorithms:
        c = copy.deepcopy(config)
        c.meta.algorithm = algorithm
        arms += meta_lib.meta_arms(base_arms, meta_lib.train_meta(c, meta_lib.meta_dir(workdir, algorithm)),
                                   algorithm)
    if in_process:
        run_in_process(config_arg, arms, workdir)
    else:
        launchers.LocalLauncher(config_arg, workdir, parallel=parallel).run(arms)
    report.write_report(workdir, arms, config.eval.best_metric, higher_is_better=config.eval.best_mode == "max")
    incontext = run_incontext(config, ks, workdir) if config.data.task == "text_to_text" else {}
    return learning_curve(workdir, arms, ks, incontext, config.eval.best_metric, algorithms=algorithms)


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
    return f"{s.mean:.4f} ± {s.std:.4f} [{s.ci_low:.4f}, {s.ci_high:.4f}] (n={s.n})"


def learning_curve(workdir: str | os.PathLike, arms: list[Arm], ks: Sequence[int], incontext: dict[int, dict],
                   metric: str = "accuracy", algorithms: Sequence[str] = ()) -> tuple[epath.Path, str]:
    """``fewshot.md`` (a row per k) and ``learning_curve.png`` (metric vs k, ± std); a
    column per meta-learning algorithm whose arms are in ``arms``."""
    workdir = as_path(workdir)
    rows = report.collect(workdir, arms, metric)
    tuned = "fine-tuned from pretrained"
    metas = {a: f"fine-tuned from meta-learned ({a})" for a in algorithms}
    curves: dict[str, dict[int, list[float]]] = {tuned: {}, **{m: {} for m in metas.values()},
                                                 "in-context": {}, "in-context, calibrated": {}}

    def by_seed(name: str) -> dict:
        return {r["seed"]: r["value"] for r in rows
                if r["group"] == name and r["status"] == "done" and r["value"] is not None}

    paired = []
    for k in ks:
        base = by_seed(group(k))
        curves[tuned][k] = list(base.values())
        for a, name in metas.items():
            mine = by_seed(f"{a} {group(k)}")
            curves[name][k] = list(mine.values())
            shared = sorted(set(base) & set(mine), key=str)
            if shared:
                paired.append((k, a, stats.paired_t_test([mine[d] for d in shared], [base[d] for d in shared])))
        draws = incontext.get(k, {}).get("draws", [])
        curves["in-context"][k] = [d["metrics"][metric] for d in draws]
        curves["in-context, calibrated"][k] = [d["metrics"]["calibrated"][metric] for d in draws
                                               if "calibrated" in d["metrics"]]
    curves = {name: c for name, c in curves.items() if any(c.values())}
    lines = [f"# Few-shot: k-shot fine-tuning vs in-context ({metric}, mean ± std [95% bootstrap CI] "
             "over draws)", "",
             "| k per label | " + " | ".join(curves) + " |", "|" + "---|" * (len(curves) + 1)]
    lines += [f"| {k} | " + " | ".join(_cell(c[k]) for c in curves.values()) + " |" for k in ks]
    if paired:
        lines += ["", "Meta-learned minus pretrained start, paired over draws (the same k-shot sample "
                      "and seed):", "", "| k | algorithm | draws | mean difference | t | p |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {a} | {t.n} | {t.mean_diff:+.4f} | {_num(t.t, '.2f')} | {_num(t.p_value, '.3g')} |"
                  for k, a, t in paired]
    _plot(curves, ks, metric, workdir / "learning_curve.png")
    text = "\n".join(lines) + "\n\n![learning curve](learning_curve.png)\n"
    (workdir / "fewshot.md").write_text(text)
    return workdir / "fewshot.md", text


def _num(x: float, spec: str) -> str:
    return "—" if math.isnan(x) else format(x, spec)


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
