"""A search's report from its stored study: every trial, the best configuration, importances.

Writes ``DIR/trials.csv``, ``DIR/search_report.md``, ``DIR/param_importance.png`` (fANOVA over the
completed trials) and ``DIR/intermediate_values.png`` (each trial's objective per eval step,
pruned trials ending in a cross where they were stopped).
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import optuna
from etils import epath
from optuna.trial import FrozenTrial, TrialState

from ftjax.eval.plots import save_figure
from ftjax.experiments.search import SearchSpec
from ftjax.paths import as_path

COLUMNS = ("number", "arm", "state", "value", "pruned_at_step", "stopped_at_step", "duration_s",
           "error")


def trial_row(t: FrozenTrial) -> dict[str, Any]:
    """One trial as a flat row: its state, value, parameters, and where a pruned one stopped."""
    duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
    return dict(number=t.number, arm=t.user_attrs.get("arm", ""), state=t.state.name.lower(),
                value=t.value, pruned_at_step=t.last_step if t.state == TrialState.PRUNED else None,
                stopped_at_step=t.user_attrs.get("stopped_at_step"), duration_s=duration,
                error=t.user_attrs.get("error", ""), **t.params)


def importances(study: optuna.Study) -> dict[str, float]:
    """fANOVA importance of each parameter over the completed trials ({} with fewer than two)."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    return {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator).items()}


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(study: optuna.Study, spec: SearchSpec, importance: dict[str, float]) -> str:
    trials = study.trials
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    lines = [f"# Search report — {spec.metric} ({spec.mode})", "",
             f"{len(trials)} of {spec.trials} trials: {counts[TrialState.COMPLETE]} complete, "
             f"{counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} failed, "
             f"{counts[TrialState.RUNNING]} running. Pruner: {spec.pruner}.", ""]
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    if finished:
        best = study.best_trial
        flags = " ".join(f"--config.{k}={v}" for k, v in best.params.items())
        lines += [f"Best: trial {best.number} (`arms/{best.user_attrs.get('arm')}`), "
                  f"{spec.metric} = {best.value:.6g} (its run_summary.json `best`).", "",
                  f"    ftjax-train --config=... {flags}", ""]
    names = list(spec.space)
    head = ["trial", "state", *names, spec.metric, "pruned at step", "stopped at step", "time"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        r = trial_row(t)
        cells = [r["number"], r["state"], *(r.get(n) for n in names), r["value"], r["pruned_at_step"],
                 r["stopped_at_step"], f"{r['duration_s']:.0f}s" if r["duration_s"] else None]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    if importance:
        lines += ["", "Parameter importance (fANOVA over the complete trials):", "",
                  "| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in importance.items()]
    else:
        lines += ["", "Parameter importance needs at least two complete trials."]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if failed:
        lines += ["", "Failed trials:", ""] + [f"- trial {t.number}: {t.user_attrs.get('error', '')}"
                                              for t in failed]
    return "\n".join(lines) + "\n"


def plots(workdir: epath.Path, study: optuna.Study, spec: SearchSpec,
          importance: dict[str, float]) -> list[epath.Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    if importance:
        fig, ax = plt.subplots(figsize=(5, 0.5 + 0.4 * len(importance)))
        names = list(importance)[::-1]
        ax.barh(names, [importance[n] for n in names], color="#4c72b0")
        ax.set_xlabel("importance (fANOVA)")
        fig.tight_layout()
        out.append(workdir / "param_importance.png")
        save_figure(fig, out[-1])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for t in study.trials:
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        pruned = t.state == TrialState.PRUNED
        (line,) = ax.plot(steps, [t.intermediate_values[s] for s in steps], "--" if pruned else "-",
                          marker=".", alpha=0.8, label=f"{t.number}{' (pruned)' if pruned else ''}")
        if pruned:  # a one-eval trial is a lone point, so mark where each pruned trial stopped
            ax.plot(steps[-1], t.intermediate_values[steps[-1]], "x", color=line.get_color(), ms=9)
    ax.set_xlabel("step")
    ax.set_ylabel(f"eval {spec.metric}")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out.append(workdir / "intermediate_values.png")
    save_figure(fig, out[-1])
    return out


def write_csv(study: optuna.Study, spec: SearchSpec, path: epath.Path) -> None:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, *spec.space])
    writer.writeheader()
    for t in study.trials:
        writer.writerow({k: "" if v is None else v for k, v in trial_row(t).items()})
    path.write_text(buf.getvalue())


def write_report(workdir: str | os.PathLike, study: optuna.Study, spec: SearchSpec
                 ) -> tuple[epath.Path, str]:
    """trials.csv + search_report.md + plots; returns the report path and its text."""
    workdir = as_path(workdir)
    importance = importances(study)
    write_csv(study, spec, workdir / "trials.csv")
    text = markdown(study, spec, importance)
    text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots(workdir, study, spec, importance)) + "\n"
    path = workdir / "search_report.md"
    path.write_text(text)
    return path, text
