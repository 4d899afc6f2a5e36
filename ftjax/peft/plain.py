"""Methods that train (some of) the model's own weights and add none: full fine-tuning, the head
alone, BitFit, partial and gradual unfreezing from the top, layer-wise LR decay (see freezing.py)."""

from __future__ import annotations

import ml_collections
from flax import nnx

from ftjax.peft import freezing, registry
from ftjax.peft.plan import Context, MethodPlan


def _full(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    return MethodPlan(model, nnx.Param)


def _head(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    return MethodPlan(model, freezing.head_filter(model))


def _bitfit(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    return MethodPlan(model, freezing.bitfit_filter(model, ctx.train_head))


def _llrd(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    scales = freezing.llrd_scales(nnx.state(model, nnx.Param), freezing.num_layers(model),
                                  m.llrd.decay, freezing.bottom(model))
    return MethodPlan(model, nnx.Param, lr_scale=scales)


def _top_blocks(model: nnx.Module, kind: str, trainable, top: int, every: int) -> MethodPlan:
    total = freezing.num_layers(model)
    mask = (freezing.top_blocks_mask_fn(total, top, every, freezing.bottom(model))
            if top > 0 or every else None)
    if not any(True for _ in nnx.to_flat_state(nnx.state(model, trainable))):
        raise ValueError(f"method {kind!r} leaves nothing to train; set "
                         "config.method.partial.top_blocks or .patterns")
    return MethodPlan(model, trainable, grad_mask_fn=mask)


def _partial(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    top = m.partial.top_blocks
    trainable = freezing.partial_filter(ctx.train_head, top, m.partial.patterns,
                                        freezing.bottom(model))
    return _top_blocks(model, "partial", trainable, top, 0)


def _gradual(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    every = m.gradual.every_steps
    if every < 1:
        raise ValueError(f"config.method.gradual.every_steps={every} must be >= 1")
    head = ctx.train_head
    trainable = freezing.params_where(lambda p, v: head or not freezing.is_head(p))
    return _top_blocks(model, "gradual", trainable, m.gradual.start_blocks, every)


registry.register(registry.Method("full", _full, plain=True))
registry.register(registry.Method("head", _head, plain=True))
registry.register(registry.Method("bitfit", _bitfit, plain=True))
registry.register(registry.Method(
    "partial", _partial, plain=True,  # patterns: comma-separated regexes over paths
    defaults={"partial": dict(top_blocks=2, patterns="")}))
registry.register(registry.Method(
    "gradual", _gradual, plain=True,  # top blocks first, one more every K steps
    defaults={"gradual": dict(start_blocks=1, every_steps=50)}))
registry.register(registry.Method(
    "llrd", _llrd, plain=True,  # block i of L trains at lr * decay ** (L - i)
    defaults={"llrd": dict(decay=0.8)}))
