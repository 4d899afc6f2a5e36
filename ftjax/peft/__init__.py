"""Fine-tuning methods as transformations of a model and of its trainable-parameter filter."""

from __future__ import annotations

from typing import Any

import ml_collections
from flax import nnx

METHODS = ("full",)


def apply_method(model: nnx.Module, method_cfg: ml_collections.ConfigDict) -> tuple[nnx.Module, Any]:
    """Transform ``model`` for ``config.method`` and return it with the trainable filter."""
    if method_cfg.kind == "full":
        return model, nnx.Param
    raise ValueError(f"config.method.kind={method_cfg.kind!r}; choose from {METHODS}")
