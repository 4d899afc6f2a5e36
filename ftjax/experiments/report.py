"""Collect a sweep's arms into results.csv, report.md (paper-ready tables) and plots."""

from __future__ import annotations

import csv
import json
import io
import math
import os
from typing import Any

from etils import epath

from ftjax.eval.plots import save_figure
from ftjax.experiments import stats
from ftjax.experiments.sweep import Arm, arm_status
from ftjax.paths import as_path
from ftjax.train.logger import read_metrics

RESULT_COLUMNS = ("name", "group", "seed", "status", "metric", "value", "best_value", "best_step",
                  "trainable_params", "total_params", "tokens_seen", "train_flops",
                  "wall_time_s", "first_step_s", "peak_rss_mb", "run", "resumed_from_step", "error")


def collect(workdir: epath.Path, arms: list[Arm], metric: str) -> list[dict[str, Any]]:
    """One row per arm with its final/best metric and cost figures (failed arms keep their error)."""
    rows = []
    for arm in arms:
        arm_dir = workdir / "arms" / arm.name
        row: dict[str, Any] = dict(name=arm.name, group=arm.group, seed=arm.seed,
                                   status=arm_status(arm_dir), metric=metric)
        if row["status"] == "done":
            s = json.loads((arm_dir / "run_summary.json").read_text())
            best = s.get("best") or {}
            row.update(value=s["final"].get(metric), trainable_params=s["trainable_params"],
                       total_params=s["total_params"], tokens_seen=s["tokens_seen"],
                       train_flops=s["train_flops"], wall_time_s=s["wall_time_s"],
                       first_step_s=s["first_step_s"], peak_rss_mb=s["peak_rss_mb"],
                       run=s.get("run"), resumed_from_step=s.get("resumed_from_step"),
                       best_value=best.get("value") if best.get("metric") == metric else None,
                       best_step=best.get("step") if best.get("metric") == metric else None)
        elif row["status"] == "failed":
            row["error"] = (arm_dir / "error.txt").read_text().strip().splitlines()[-1][:300]
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: epath.Path) -> None:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in RESULT_COLUMNS})
    path.write_text(out.getvalue())


def _groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "done" and row.get("value") is not None:
            out.setdefault(row["group"], []).append(row)
    return out


def _fmt_params(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{int(n):,}"


def markdown(rows: list[dict[str, Any]], metric: str, higher_is_better: bool) -> str:
    groups = _groups(rows)
    lines = [f"# Sweep report — {metric}", "",
             f"{len(rows)} arms: {sum(r['status'] == 'done' for r in rows)} done, "
             f"{sum(r['status'] == 'failed' for r in rows)} failed, "
             f"{sum(r['status'] == 'pending' for r in rows)} pending.", "",
             f"| method | n | {metric} mean ± std | 95% bootstrap CI | trainable params | "
             "wall time / arm | first step |",
             "|---|---|---|---|---|---|---|"]
    summaries = {g: stats.summarize([r["value"] for r in rs]) for g, rs in groups.items()}
    order = sorted(groups, key=lambda g: summaries[g].mean, reverse=higher_is_better)
    for g in order:
        s, rs = summaries[g], groups[g]
        trainable, total = rs[0]["trainable_params"], rs[0]["total_params"]
        wall = sum(r["wall_time_s"] for r in rs) / len(rs)
        first = sum(r["first_step_s"] for r in rs) / len(rs)
        lines.append(f"| {g} | {s.n} | {s.mean:.4f} ± {s.std:.4f} | [{s.ci_low:.4f}, {s.ci_high:.4f}] | "
                     f"{_fmt_params(trainable)} ({100 * trainable / total:.2f}%) | {wall:.0f}s | {first:.1f}s |")
    if len(order) > 1:
        lines += ["", f"Paired t-tests against the best method ({order[0]}) over shared seeds:", "",
                  "| method | shared seeds | mean difference (best − method) | t | p |", "|---|---|---|---|---|"]
        best = {r["seed"]: r["value"] for r in groups[order[0]]}
        for g in order[1:]:
            mine = {r["seed"]: r["value"] for r in groups[g]}
            shared = sorted(set(best) & set(mine), key=str)
            test = stats.paired_t_test([best[k] for k in shared], [mine[k] for k in shared])
            t = "—" if math.isnan(test.t) else f"{test.t:.2f}"
            p = "—" if math.isnan(test.p_value) else f"{test.p_value:.3g}"
            lines.append(f"| {g} | {test.n} | {test.mean_diff:+.4f} | {t} | {p} |")
    # Seeds of one method compile the same program: the first pays, the others hit the cache.
    pairs = [(rs[0]["first_step_s"], r["first_step_s"]) for rs in groups.values() for r in rs[1:]]
    if pairs:
        first = sum(a for a, _ in pairs) / len(pairs)
        later = sum(b for _, b in pairs) / len(pairs)
        lines += ["", f"Compile: within a method, the first seed's first step took {first:.1f}s on "
                      f"average and later seeds {later:.1f}s with the shared persistent XLA cache "
                      f"(about {sum(max(a - b, 0.0) for a, b in pairs):.0f}s saved in total)."]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed arms:", ""] + [f"- `{r['name']}`: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def learning_curve(run: epath.Path) -> list[tuple[int, float]]:
    """(step, train loss) of a run, one point per step (``read_metrics``)."""
    return [(r["step"], r["train/loss"]) for r in read_metrics(run) if "train/loss" in r]


def plots(workdir: epath.Path, rows: list[dict[str, Any]], metric: str) -> list[epath.Path]:
    """Metric per method with error bars, learning curves, metric vs trainable parameters."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    if not groups:
        return []
    names = sorted(groups)
    out = []
    summaries = [stats.summarize([r["value"] for r in groups[g]]) for g in names]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3.5))
    ax.bar(names, [s.mean for s in summaries],
           yerr=[[s.mean - s.ci_low for s in summaries], [s.ci_high - s.mean for s in summaries]],
           capsize=4, color="#4c72b0")
    lo = min(s.ci_low for s in summaries)
    ax.set_ylim(max(0.0, lo - 0.1 * abs(lo)), None)
    ax.set_ylabel(f"{metric} (mean, 95% CI)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    out.append(workdir / f"{metric}_by_method.png")
    save_figure(fig, out[-1])

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for g in names:
        for i, r in enumerate(groups[g]):
            pts = learning_curve(workdir / "arms" / r["name"])
            if pts:
                ax.plot(*zip(*pts), color=f"C{names.index(g)}", alpha=0.8, label=g if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(workdir / "learning_curves.png")
    save_figure(fig, out[-1])

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for g, s in zip(names, summaries):
        x = groups[g][0]["trainable_params"]
        ax.errorbar([x], [s.mean], yerr=[[s.mean - s.ci_low], [s.ci_high - s.mean]], fmt="o", capsize=3)
        ax.annotate(g, (x, s.mean), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    fig.tight_layout()
    out.append(workdir / f"{metric}_vs_trainable_params.png")
    save_figure(fig, out[-1])
    return out


def write_report(workdir: str | os.PathLike, arms: list[Arm], metric: str, higher_is_better: bool
                 ) -> tuple[epath.Path, str]:
    """results.csv + report.md + plots; returns the report path and its text."""
    workdir = as_path(workdir)
    rows = collect(workdir, arms, metric)
    write_csv(rows, workdir / "results.csv")
    text = markdown(rows, metric, higher_is_better)
    pngs = plots(workdir, rows, metric)
    if pngs:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
    (workdir / "report.md").write_text(text)
    return workdir / "report.md", text
