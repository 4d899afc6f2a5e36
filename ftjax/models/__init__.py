"""Model families, presets, loading and export."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from ftjax.models import registry
from ftjax.models.loading import CheckpointError, from_pretrained
from ftjax.models.saving import save_pretrained

__all__ = ["CheckpointError", "create", "from_pretrained", "save_pretrained"]


def create(model_cfg: ml_collections.ConfigDict, mesh: Mesh, *, num_labels: int = 0,
           seed: int = 0) -> tuple[nnx.Module, Any]:
    """Build the model named by ``config.model`` on ``mesh``; returns (model, tokenizer or None).

    ``source`` is a preset name (random init, no tokenizer) or anything ``from_pretrained`` takes.
    """
    runtime = dict(dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype,
                   scan_layers=model_cfg.scan_layers, remat=model_cfg.remat)
    overrides = dict(model_cfg.overrides)
    if model_cfg.source in registry.PRESETS:
        family, cfg = registry.get_preset(model_cfg.source)
        cfg = dataclasses.replace(cfg, **runtime, **overrides)
        model = registry.init_sharded(
            lambda rngs: family.build(cfg, model_cfg.head, num_labels, rngs), mesh, seed)
        return model, None
    from ftjax.models.loading import from_pretrained
    return from_pretrained(model_cfg.source, head=model_cfg.head, num_labels=num_labels,
                           mesh=mesh, allow_pickle=model_cfg.allow_pickle, **runtime, **overrides)
