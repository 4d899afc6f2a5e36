"""Statistics for comparing methods across seeds: mean ± std, bootstrap CI, paired t-test."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats


@dataclasses.dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); 0 for a single value
    ci_low: float
    ci_high: float


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    x = np.asarray(values, np.float64)
    if len(x) < 2:
        return float(x.mean()), float(x.mean())
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def summarize(values: Sequence[float], *, confidence: float = 0.95, seed: int = 0) -> Summary:
    x = np.asarray(values, np.float64)
    low, high = bootstrap_ci(x, confidence=confidence, seed=seed)
    return Summary(n=len(x), mean=float(x.mean()), std=float(x.std(ddof=1)) if len(x) > 1 else 0.0,
                   ci_low=low, ci_high=high)


@dataclasses.dataclass(frozen=True)
class PairedTest:
    n: int
    mean_diff: float  # mean of a - b over shared seeds
    t: float
    p_value: float  # two-sided; nan when undefined (n < 2 or zero variance)


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Two-sided paired t-test of ``a - b`` (same seeds, same order)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n = len(d)
    if n < 2:
        return PairedTest(n, float(d.mean()) if n else math.nan, math.nan, math.nan)
    sd = d.std(ddof=1)
    if sd == 0:
        return PairedTest(n, float(d.mean()), math.nan, math.nan)
    t = d.mean() / (sd / math.sqrt(n))
    p = 2 * scipy_stats.t.sf(abs(t), df=n - 1)
    return PairedTest(n, float(d.mean()), float(t), float(p))
