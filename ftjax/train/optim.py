"""Optimizer and learning-rate schedule from ``config.train``.

The peak learning rate and weight decay live in the optimizer state (``inject_hyperparams``), so
they are traced values: sweep arms that change only them reuse one compiled step. The schedule's
*shape* (warmup, decay) multiplies the update; for AdamW that equals scheduling the rate itself,
including the decoupled weight decay, exactly as ``optax.adamw(schedule)`` does.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd")


def schedule_shape(train_cfg: ml_collections.ConfigDict) -> Callable[[Any], Any]:
    """Multiplier in [0, 1] over steps: linear warmup, then cosine / linear decay or constant."""
    steps, warmup = int(train_cfg.steps), int(train_cfg.warmup_steps)
    floor = float(train_cfg.min_lr_ratio)
    kind = train_cfg.schedule
    if kind not in SCHEDULES:
        raise ValueError(f"config.train.schedule={kind!r}; choose from {SCHEDULES}")

    def shape(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1) / max(warmup, 1)) if warmup > 0 else 1.0
        progress = jnp.clip((step - warmup) / max(steps - warmup, 1), 0.0, 1.0)
        if kind == "cosine":
            decay = floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        elif kind == "linear":
            decay = floor + (1 - floor) * (1 - progress)
        else:
            decay = 1.0
        return jnp.where(step < warmup, warm, decay)

    return shape


class UnfreezeState(NamedTuple):
    """The unfreezing mask's state: the step it masks and the norm of the gradient it left."""
    count: jax.Array
    grad_norm: jax.Array


def _unfreezing(mask_fn: Callable[[Any, jax.Array], Any]
                ) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """The first and last links of the chain for ``mask_fn(tree, step)``: the gradient is masked
    before clipping and the moments see it, the update after weight decay, so frozen slices stay
    bitwise unchanged and start with fresh moments when they unfreeze."""
    def mask_grads(g, s, p=None):
        g = mask_fn(g, s.count)
        return g, UnfreezeState(count=s.count + 1, grad_norm=optax.tree.norm(g))

    def mask_updates(u, s, p=None):
        return mask_fn(u, s.count), optax.ScaleByScheduleState(count=s.count + 1)

    def count(_):
        return jnp.zeros([], jnp.int32)

    return (optax.GradientTransformation(lambda p: UnfreezeState(count(p), jnp.zeros([])), mask_grads),
            optax.GradientTransformation(lambda p: optax.ScaleByScheduleState(count(p)), mask_updates))


def make_optimizer(train_cfg: ml_collections.ConfigDict, *, weight_decay_mask: Any = None,
                   lr_scale: Any = None,
                   mask_fn: Callable[[Any, jax.Array], Any] | None = None
                   ) -> optax.GradientTransformation:
    """[unfreezing mask ->] clip -> AdamW/SGD (peak lr in state) -> schedule shape
    [-> per-parameter lr scale] [-> unfreezing mask].

    ``lr_scale`` is an optional pytree of per-parameter multipliers (layer-wise LR decay);
    ``mask_fn(tree, step)`` zeroes the frozen slices (partial and gradual unfreezing) of the
    gradient and of the update (see ``_unfreezing``): the one place a method's mask applies.
    """
    kind = train_cfg.optimizer
    if kind == "adamw":
        inner = optax.inject_hyperparams(optax.adamw)(
            learning_rate=float(train_cfg.learning_rate), b1=float(train_cfg.b1),
            b2=float(train_cfg.b2), eps=float(train_cfg.eps),
            weight_decay=float(train_cfg.weight_decay), mask=weight_decay_mask)
    elif kind == "sgd":
        inner = optax.inject_hyperparams(optax.sgd)(learning_rate=float(train_cfg.learning_rate))
    else:
        raise ValueError(f"config.train.optimizer={kind!r}; choose from {OPTIMIZERS}")
    parts = []
    if mask_fn is not None:
        first, last = _unfreezing(mask_fn)
        parts.append(first)
    if float(train_cfg.grad_clip) > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
    parts += [inner, optax.scale_by_schedule(schedule_shape(train_cfg))]
    if lr_scale is not None:
        parts.append(optax.GradientTransformation(
            lambda _: optax.EmptyState(),
            lambda u, s, p=None: (jax.tree.map(lambda x, k: x * k, u, lr_scale), s)))
    if mask_fn is not None:
        parts.append(last)
    return optax.chain(*parts)


def _is_injected(part: Any) -> bool:
    return hasattr(part, "hyperparams") and hasattr(part, "inner_state")


def grad_norm(opt_state: Any, grads: Any) -> Any:
    """The global norm of the gradient the optimizer took: after the unfreezing mask, if any."""
    for part in opt_state:
        if isinstance(part, UnfreezeState):
            return part.grad_norm
    return optax.tree.norm(grads)


def peak_learning_rate(opt_state: Any) -> Any:
    """The injected peak learning rate inside a ``make_optimizer`` state."""
    for part in opt_state:
        if _is_injected(part):
            return part.hyperparams["learning_rate"]
    raise ValueError("optimizer state has no injected learning rate")
