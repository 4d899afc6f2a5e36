"""Model families, presets, loading and export."""

from __future__ import annotations

from typing import Any

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from ftjax.models import registry
from ftjax.models.bert import POOLINGS
from ftjax.models.loading import CheckpointError, ModelConfigError, from_pretrained, replace_config
from ftjax.models.saving import save_pretrained

__all__ = ["CheckpointError", "ModelConfigError", "create", "from_pretrained", "save_pretrained"]


def _pooling(model_cfg: ml_collections.ConfigDict) -> dict[str, str]:
    """``config.model.pooling`` as a model-config field ({} = the checkpoint's own choice)."""
    pooling, head = model_cfg.get("pooling", ""), model_cfg.head  # runs saved before the key: ""
    old = model_cfg.overrides.get("pooling", pooling)  # the earlier spelling, still in saved runs
    if pooling and old != pooling:
        raise ModelConfigError(f"config.model.pooling={pooling!r} but config.model.overrides.pooling="
                               f"{old!r}; set config.model.pooling only")
    if not pooling:
        return {}
    if pooling not in POOLINGS:
        raise ModelConfigError(f"config.model.pooling={pooling!r}; choose from {', '.join(POOLINGS)} "
                               "or '' (the checkpoint's own: sentence-transformers' 1_Pooling, "
                               "else the pooler)")
    if head != "sequence_classification":
        raise ModelConfigError(f"config.model.pooling={pooling!r} is for sequence_classification "
                               f"heads; config.model.head={head!r} does not pool")
    return {"pooling": pooling}


def create(model_cfg: ml_collections.ConfigDict, mesh: Mesh, *, num_labels: int = 0,
           seed: int = 0) -> tuple[nnx.Module, Any]:
    """Build the model named by ``config.model`` on ``mesh``; returns (model, tokenizer or None).

    ``source`` is a preset name (random init, no tokenizer) or anything ``from_pretrained`` takes.
    """
    fields = model_fields(model_cfg)
    if model_cfg.source in registry.PRESETS:
        family, cfg = registry.get_preset(model_cfg.source)
        cfg = replace_config(family, cfg, **fields)
        model = registry.init_sharded(
            lambda rngs: family.build(cfg, model_cfg.head, num_labels, rngs), mesh, seed)
        return model, None
    from ftjax.models.loading import from_pretrained
    return from_pretrained(model_cfg.source, head=model_cfg.head, num_labels=num_labels,
                           mesh=mesh, allow_pickle=model_cfg.allow_pickle, **fields)


def model_fields(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The model-config fields ``config.model`` sets: dtypes, scan, remat, overrides, pooling."""
    runtime = dict(dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype,
                   scan_layers=model_cfg.scan_layers, remat=model_cfg.remat)
    return {**runtime, **dict(model_cfg.overrides), **_pooling(model_cfg)}
