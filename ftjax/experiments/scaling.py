"""Data scaling: is the gain per doubling of the train set constant (metric linear in log2 n)?

The arms of a sweep train on nested subsets of one train split (``config.data.subset``) and are
grouped into series by ``method.kind``. Per series, an ordinary least-squares fit of the metric
against log2(train rows) over every arm gives the slope per doubling with a t-distribution 95%
confidence interval and R²; linearity is tested twice: a quadratic term in log2 n (its t-test
p-value) and, when sizes have several seeds, the lack-of-fit F-test against the per-size means
(pure error). ``write_report`` writes ``scaling.md`` and ``scaling.png`` beside the sweep report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np
from etils import epath
from scipy import stats as scipy_stats

from ftjax.eval.plots import save_figure
from ftjax.experiments import report, stats
from ftjax.experiments.sweep import Arm, SweepError
from ftjax.paths import as_path

ALPHA = 0.05  # the level of the confidence interval (1 - ALPHA) and of both linearity tests


@dataclasses.dataclass(frozen=True)
class Fit:
    """metric = intercept + slope * log2(n), fitted over every run (not the per-size means)."""
    points: int
    sizes: int  # distinct n
    intercept: float
    slope: float  # change of the metric per doubling of n
    slope_se: float
    slope_low: float  # 95% t confidence interval of the slope (nan below 3 points)
    slope_high: float
    r2: float
    quad: float  # coefficient of (log2 n)^2 in the quadratic fit (nan below 3 sizes / 4 points)
    quad_p: float  # two-sided t-test p-value of that coefficient
    lack_of_fit_p: float  # F-test of the line against the per-size means (nan without replicates)

    def linear(self) -> bool | None:
        """True when neither test rejects the line at ALPHA; None when neither can be run."""
        ps = [p for p in (self.quad_p, self.lack_of_fit_p) if not math.isnan(p)]
        return None if not ps else min(ps) >= ALPHA


def _ols(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Coefficients, their standard errors (nan without residual degrees of freedom), SSE, df."""
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    sse = float(np.sum((y - X @ beta) ** 2))
    df = len(y) - X.shape[1]
    se = (np.sqrt(np.diag(sse / df * np.linalg.inv(X.T @ X))) if df > 0
          else np.full(X.shape[1], math.nan))
    return beta, se, sse, df


def fit(sizes: Sequence[float], values: Sequence[float]) -> Fit:
    """Least-squares fit of ``values`` against log2(``sizes``), one point per run."""
    x = np.log2(np.asarray(sizes, np.float64))
    y = np.asarray(values, np.float64)
    levels = np.unique(x)
    if len(levels) < 2:
        raise SweepError(f"a scaling fit needs at least 2 train sizes, got {len(levels)}")
    beta, se, sse, df = _ols(np.stack([np.ones_like(x), x], 1), y)
    half = scipy_stats.t.ppf(1 - ALPHA / 2, df) * se[1] if df > 0 else math.nan
    sst = float(np.sum((y - y.mean()) ** 2))
    quad = quad_p = math.nan
    if len(levels) >= 3 and len(y) >= 4:
        qbeta, qse, _, qdf = _ols(np.stack([np.ones_like(x), x, x * x], 1), y)
        quad = float(qbeta[2])
        quad_p = float(2 * scipy_stats.t.sf(abs(quad / qse[2]), qdf)) if qse[2] > 0 else math.nan
    lof_p = math.nan
    pure_df, lof_df = len(y) - len(levels), len(levels) - 2
    if pure_df > 0 and lof_df > 0:
        pure = float(sum(np.sum((y[x == v] - y[x == v].mean()) ** 2) for v in levels))
        if pure > 0:
            f = ((sse - pure) / lof_df) / (pure / pure_df)
            lof_p = float(scipy_stats.f.sf(f, lof_df, pure_df))
    return Fit(points=len(y), sizes=len(levels), intercept=float(beta[0]), slope=float(beta[1]),
               slope_se=float(se[1]), slope_low=float(beta[1] - half), slope_high=float(beta[1] + half),
               r2=1 - sse / sst if sst > 0 else math.nan, quad=quad, quad_p=quad_p, lack_of_fit_p=lof_p)


def linear_range(sizes: Sequence[float], values: Sequence[float]) -> tuple[float, float] | None:
    """The widest run of at least 3 consecutive sizes whose fit has a slope significantly above
    0 and passes a linearity test without being rejected (smallest sizes first on ties); None
    when there is none."""
    levels = sorted(set(sizes))
    for width in range(len(levels), 2, -1):
        for i in range(len(levels) - width + 1):
            lo, hi = levels[i], levels[i + width - 1]
            pts = [(s, v) for s, v in zip(sizes, values) if lo <= s <= hi]
            f = fit(*zip(*pts))
            if f.slope_low > 0 and f.linear():
                return lo, hi
    return None


# ----------------------------------------------------------------------------- the study's runs

def collect(workdir: epath.Path, arms: list[Arm], metric: str) -> dict[str, list[dict[str, Any]]]:
    """Finished arms as {series (method.kind): [{name, seed, n, value, steps, batch}]}."""
    series: dict[str, list[dict[str, Any]]] = {}
    for row in report.collect(workdir, arms, metric):
        if row["status"] != "done" or row["value"] is None:
            continue
        arm_dir = workdir / "arms" / row["name"]
        splits = json.loads((arm_dir / "data_report.json").read_text()).get("splits")
        if not splits:
            raise SweepError(f"{arm_dir}/data_report.json has no 'splits': a scaling study needs a "
                             "single-task data config (not a mixture)")
        config = json.loads((arm_dir / "config.json").read_text())
        series.setdefault(config["method"]["kind"], []).append(dict(
            name=row["name"], seed=row["seed"], n=splits["train"]["rows"], value=row["value"],
            steps=config["train"]["steps"], batch=config["train"]["batch_size"]))
    return series


# ----------------------------------------------------------------------------- report

def _p(p: float) -> str:
    return "—" if math.isnan(p) else f"{p:.3g}"


def _ci(f: Fit) -> str:
    return "—" if math.isnan(f.slope_low) else f"[{f.slope_low:+.4f}, {f.slope_high:+.4f}]"


def verdict(method: str, runs: list[dict[str, Any]], f: Fit) -> str:
    """One sentence: does a doubling of n give a constant gain for this method, over which n."""
    lo, hi = min(r["n"] for r in runs), max(r["n"] for r in runs)
    sizes, values = [r["n"] for r in runs], [r["value"] for r in runs]
    if math.isnan(f.slope_low):
        return f"**{method}**: too few runs to test the claim ({f.points} runs at {f.sizes} sizes)."
    if f.slope_low <= 0:
        return (f"**{method}**: the claim does not hold for n = {lo}–{hi}: the slope per doubling "
                f"{f.slope:+.4f} has a 95% CI {_ci(f)} that does not exclude 0 (no reliable gain).")
    linear = f.linear()
    if linear is None:
        return (f"**{method}**: each doubling of n = {lo}–{hi} adds {f.slope:+.4f} {_ci(f)}, but "
                "linearity cannot be tested with fewer than 3 sizes and 4 runs.")
    if linear:
        return (f"**{method}**: the claim holds for n = {lo}–{hi}: each doubling adds {f.slope:+.4f} "
                f"{_ci(f)} and neither linearity test rejects a line at {ALPHA:g} (quadratic term p = "
                f"{_p(f.quad_p)}, lack of fit p = {_p(f.lack_of_fit_p)}).")
    window = linear_range(sizes, values)
    where = (f"it is linear with a positive slope only for n = {window[0]}–{window[1]}" if window
             else "no run of 3 or more consecutive sizes is linear with a positive slope")
    return (f"**{method}**: the claim does not hold over all of n = {lo}–{hi}: the gain per doubling "
            f"is not constant (quadratic term {f.quad:+.4f}, p = {_p(f.quad_p)}; lack of fit p = "
            f"{_p(f.lack_of_fit_p)}); {where}.")


def _budget(series: dict[str, list[dict[str, Any]]]) -> str:
    runs = [r for rs in series.values() for r in rs]
    budgets = sorted({(r["steps"], r["batch"]) for r in runs})
    n_lo, n_hi = min(r["n"] for r in runs), max(r["n"] for r in runs)
    if len(budgets) == 1:
        (steps, batch), = budgets
        return (f"Step budget: fixed, {steps} steps × {batch} examples per arm at every size "
                f"({steps * batch / n_lo:.1f} epochs at n = {n_lo}, {steps * batch / n_hi:.2f} at n = {n_hi}).")
    per_n = sorted({(r["n"], r["steps"] * r["batch"] / r["n"]) for r in runs})
    return "Step budget: scaled per size (" + ", ".join(f"n = {n}: {e:.1f} epochs" for n, e in per_n) + ")."


def markdown(series: dict[str, list[dict[str, Any]]], fits: dict[str, Fit], metric: str) -> str:
    methods = sorted(series)
    sizes = sorted({r["n"] for rs in series.values() for r in rs})
    lines = [f"# Data scaling: {metric} per doubling of the train set", "",
             _budget(series) + " Same eval set for every arm; mean ± sample std over seeds.", "",
             "| train rows n | log2 n | " + " | ".join(f"{m} {metric} (seeds)" for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for n in sizes:
        cells = []
        for m in methods:
            v = [r["value"] for r in series[m] if r["n"] == n]
            s = stats.summarize(v) if v else None
            cells.append(f"{s.mean:.4f} ± {s.std:.4f} ({s.n})" if s else "—")
        lines.append(f"| {n} | {math.log2(n):.2f} | " + " | ".join(cells) + " |")
    lines += ["", f"Least-squares fit over every run: {metric} = a + b · log2 n "
                  f"(b: gain per doubling, 95% t interval; linearity: t-test of a (log2 n)² term, "
                  f"lack-of-fit F-test against the per-size means).", "",
              "| method | runs | sizes | b per doubling | 95% CI of b | R² | quadratic term | p (quadratic) | "
              "p (lack of fit) |", "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        f = fits.get(m)
        if f is None:
            lines.append(f"| {m} | {len(series[m])} | 1 | — | — | — | — | — | — |")
            continue
        quad = "—" if math.isnan(f.quad) else f"{f.quad:+.5f}"
        r2 = "—" if math.isnan(f.r2) else f"{f.r2:.3f}"
        lines.append(f"| {m} | {f.points} | {f.sizes} | {f.slope:+.4f} | {_ci(f)} | {r2} | {quad} | "
                     f"{_p(f.quad_p)} | {_p(f.lack_of_fit_p)} |")
    lines += ["", "Verdict (\"each doubling of the dataset size gives a linear increase in quality\"):", ""]
    lines += [f"- {verdict(m, series[m], fits[m])}" if m in fits else
              f"- **{m}**: finished runs at one train size only; nothing to fit." for m in methods]
    return "\n".join(lines) + "\n"


def _plot(series: dict[str, list[dict[str, Any]]], fits: dict[str, Fit], metric: str, path: epath.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    sizes = sorted({r["n"] for rs in series.values() for r in rs})
    for i, m in enumerate(sorted(series)):
        runs, f, color = series[m], fits.get(m), f"C{i}"
        x = np.log2([r["n"] for r in runs])
        ax.scatter(x + 0.04 * (i - 0.5), [r["value"] for r in runs], s=14, alpha=0.5, color=color)
        means = [(math.log2(n), np.mean([r["value"] for r in runs if r["n"] == n]))
                 for n in sizes if any(r["n"] == n for r in runs)]
        ax.plot(*zip(*means), "o", color=color, markersize=6, label=f"{m} (mean per size)")
        if f is not None:
            line = np.linspace(x.min(), x.max(), 50)
            ax.plot(line, f.intercept + f.slope * line, "-", color=color, alpha=0.8,
                    label=f"{m} fit: {f.slope:+.4f} per doubling")
    ax.set_xticks([math.log2(n) for n in sizes], [str(n) for n in sizes], fontsize=7)
    ax.set_xlabel("train rows n (log2 scale)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_report(workdir: str | os.PathLike, arms: list[Arm], metric: str) -> tuple[epath.Path, str]:
    """``scaling.md`` (table per size, fit, verdict) and ``scaling.png``; returns the path and text."""
    workdir = as_path(workdir)
    series = collect(workdir, arms, metric)
    if not series:
        raise SweepError(f"{workdir}: no finished arm to fit; run the sweep first")
    fits = {m: fit([r["n"] for r in rs], [r["value"] for r in rs])
            for m, rs in series.items() if len({r["n"] for r in rs}) > 1}
    _plot(series, fits, metric, workdir / "scaling.png")
    text = markdown(series, fits, metric) + "\n![scaling](scaling.png)\n"
    (workdir / "scaling.md").write_text(text)
    return workdir / "scaling.md", text
