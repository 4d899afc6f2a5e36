"""The reference policy of a preference step, without a second copy of an adapted model.

- ``adapter_off``: the same merged model with every adapted Linear run as its frozen base
  (``WrappedLinear.__call__``): exactly the backbone, no weights copied.
- ``copy``: a frozen copy of the trainable parameters as they were at step 0 (full fine-tuning).
- ``precomputed``: reference log-probs computed once per pair and stored beside the prepared data.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import jax
import numpy as np
from etils import epath
from flax import nnx

from ftjax.peft import surgery
from ftjax.peft.linear import WrappedLinear
from ftjax.peft.prompt import PrefixKV, VirtualTokens
from ftjax.preference.losses import PreferenceConfigError

MODES = ("adapter_off", "copy", "precomputed")


class BaseOnly(nnx.Module):
    """An adapted Linear with its adapter switched off: the wrapped layer's own ``x W + b``."""

    def __init__(self, inner: WrappedLinear):
        self.inner = inner

    def __call__(self, x: jax.Array) -> jax.Array:
        return WrappedLinear.__call__(self.inner, x)


def adapted_linears(model: nnx.Module) -> list[tuple[tuple, WrappedLinear]]:
    """Every Linear that carries an adapter (a bare quantised base is no adapter)."""
    return [(p, m) for p, m in surgery.find(model, WrappedLinear) if type(m) is not WrappedLinear]


def has_adapters(model: nnx.Module) -> bool:
    return bool(adapted_linears(model) or surgery.find(model, (PrefixKV, VirtualTokens)))


def resolve(mode: str, model: nnx.Module) -> str:
    """``auto`` -> ``adapter_off`` for an adapted model, else ``copy``; checks an explicit choice."""
    if mode == "auto":
        mode = "adapter_off" if has_adapters(model) else "copy"
    if mode == "adapter_off":
        if surgery.find(model, (PrefixKV, VirtualTokens)):
            raise PreferenceConfigError(
                "config.preference.reference=adapter_off cannot switch off prefix/prompt tuning inside "
                "the step; use reference=precomputed (or copy)")
        if not adapted_linears(model):
            raise PreferenceConfigError("config.preference.reference=adapter_off needs an adapter method "
                                        "(config.method.kind); for full fine-tuning use copy or precomputed")
    return mode


def switch_off_adapters(model: nnx.Module) -> nnx.Module:
    """``model`` (merged inside the step, so this touches no stored state) with adapters off."""
    for path, module in adapted_linears(model):
        surgery.replace(model, path, BaseOnly(module))
    return model


def cache_path(data_key: str, model_source: str, directory: str | os.PathLike) -> epath.Path:
    """Where a data set's reference log-probs under one starting model live."""
    key = hashlib.sha256(json.dumps([data_key, model_source]).encode()).hexdigest()[:16]
    return epath.Path(directory) / f"reference-logps-{key}.npy"


def cached(path: epath.Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Load ``path`` or compute and write it (written whole, then renamed into place)."""
    if path.exists():
        with path.open("rb") as f:
            return np.load(f)
    values = np.asarray(compute(), np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    with tmp.open("wb") as f:
        np.save(f, values)
    tmp.rename(path)
    return values


def frozen_copy(params: Any) -> Any:
    """A copy of the trainable parameters that the optimizer never touches (donation-safe)."""
    return jax.tree.map(lambda x: x.copy(), params)
