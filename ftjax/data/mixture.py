"""Task sampling weights of a multi-task mixture."""

from __future__ import annotations

import numpy as np

from ftjax.data.records import DataError

WEIGHTINGS = ("proportional", "temperature", "equal", "explicit")


def weights(sizes: list[int], mix, names: list[str]) -> np.ndarray:
    """Probabilities of drawing each task: proportional to size, to ``size ** (1/T)``, equal, or
    the explicit ``mix.weights[name]``."""
    n = np.asarray(sizes, np.float64)
    if mix.weighting == "proportional":
        w = n
    elif mix.weighting == "temperature":
        if mix.temperature <= 0:
            raise DataError(f"config.data.mixture.temperature must be > 0, got {mix.temperature}")
        w = n ** (1.0 / mix.temperature)
    elif mix.weighting == "equal":
        w = np.ones_like(n)
    elif mix.weighting == "explicit":
        missing = [t for t in names if t not in mix.weights]
        if missing:
            raise DataError(f"config.data.mixture.weights has no weight for tasks {missing}")
        w = np.asarray([float(mix.weights[t]) for t in names])
    else:
        raise DataError(f"config.data.mixture.weighting={mix.weighting!r} is not one of {WEIGHTINGS}")
    if (w < 0).any() or w.sum() <= 0:
        raise DataError(f"mixture weights {dict(zip(names, w.tolist()))} must be >= 0 with a positive sum")
    return w / w.sum()
