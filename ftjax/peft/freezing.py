"""Transfer-learning methods as trainable filters, layer masks and per-parameter LR scales.

Parameters fall into four groups: the task head (top-level modules other than ``model``), the
stacked blocks (leading ``layers`` axis), the backbone's bottom (embeddings) and its top (final
norm, pooler). Because blocks are stacked, "the top N blocks" is a slice of one array: such a
method trains the stacked arrays and zeroes the gradient *and* the update of the frozen slices
(weight decay included), so they stay bitwise unchanged until they are unfrozen.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.models import registry
from ftjax.peft import surgery


def is_head(path: tuple) -> bool:
    return str(path[0]) != "model"


def is_stacked(var: nnx.Variable) -> bool:
    return surgery.axes_of(var)[:1] == ("layers",)


def bottom(model: nnx.Module) -> tuple[str, ...]:
    """The backbone's modules below the blocks (its family's embeddings)."""
    return registry.family_of(model).embeddings


def is_bottom(path: tuple, below: tuple[str, ...]) -> bool:
    """Whether ``path`` is in the backbone's bottom ``below`` (see :func:`bottom`)."""
    return not is_head(path) and len(path) > 1 and str(path[1]) in below


def params_where(pred: Callable[[tuple, nnx.Variable], bool]) -> Callable[[tuple, Any], bool]:
    """An nnx filter: ``Param`` leaves satisfying ``pred(path, var)``."""
    return lambda path, x: isinstance(x, nnx.Param) and pred(tuple(path), x)


def num_layers(model: nnx.Module) -> int:
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if is_stacked(var):
            return var.get_value().shape[0]
    raise ValueError(f"{type(model).__name__} has no stacked blocks")


def head_filter(model: nnx.Module) -> Callable:
    if not any(is_head(tuple(p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))):
        raise ValueError(f"{type(model).__name__} has no separate task head (a tied LM head is the "
                         "input embedding); method 'head' needs a classifier or an untied lm_head")
    return params_where(lambda p, v: is_head(p))


def regex_filter(patterns: str) -> Callable[[tuple, nnx.Variable], bool]:
    """``pred(path, var)`` true when any comma-separated regex matches the parameter path."""
    rxs = [re.compile(p.strip()) for p in patterns.split(",") if p.strip()]
    return lambda path, var: any(rx.search(surgery.path_str(path)) for rx in rxs)


def bitfit_filter(model: nnx.Module, train_head: bool) -> Callable:
    """Biases only (BitFit); the family must have some."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    if not any(str(p[-1]) == "bias" and not is_head(tuple(p)) for p, _ in flat):
        cfg = getattr(model.model, "cfg", None)
        family = getattr(cfg, "model_type", type(model.model).__name__)
        raise ValueError(f"BitFit trains bias terms, but this {family} model has none (its "
                         "linear layers and norms are bias-free); choose another method")
    return params_where(lambda p, v: str(p[-1]) == "bias" or (train_head and is_head(p)))


# ---------------------------------------------------------------------------------------------
# Unfreezing from the top: partial (fixed N) and gradual (one more block every K steps)
# ---------------------------------------------------------------------------------------------

def unfrozen_blocks(step: jax.Array, total: int, top: int, every: int) -> jax.Array:
    """How many blocks (from the top) train at ``step``: ``top`` then one more every ``every``."""
    if every <= 0:
        return jnp.asarray(min(top, total))
    return jnp.minimum(total, top + step // every)


def top_blocks_mask_fn(total: int, top: int, every: int, below: tuple[str, ...]
                       ) -> Callable[[Any, jax.Array], Any]:
    """``mask(tree, step)`` zeroing stacked slices below the unfrozen blocks, and the bottom
    (embeddings) until every block is unfrozen; ``tree`` is a trainable-params-shaped State."""

    def mask(tree: Any, step: jax.Array) -> Any:
        n = unfrozen_blocks(step, total, top, every)
        flat = []
        for path, var in nnx.to_flat_state(tree):
            x = var.get_value()
            if is_stacked(var):
                keep = (jnp.arange(total) >= total - n).reshape((total,) + (1,) * (x.ndim - 1))
                x = jnp.where(keep, x, jnp.zeros_like(x))
            elif is_bottom(tuple(path), below):
                x = jnp.where(n >= total, x, jnp.zeros_like(x))
            flat.append((path, var.replace(x)))
        return nnx.from_flat_state(flat)

    return mask


def partial_filter(train_head: bool, top_blocks: int, patterns: str, below: tuple[str, ...]
                   ) -> Callable:
    """The head, parameters matching ``patterns`` and, when ``top_blocks > 0``, the stacked blocks
    (masked down to the top ones) and the backbone's top; never the embeddings."""
    extra = regex_filter(patterns)

    def pred(path, var):
        if is_head(path):
            return train_head
        return extra(path, var) or (top_blocks > 0 and not is_bottom(path, below))

    return params_where(pred)


def llrd_scales(params: nnx.State, total: int, decay: float, below: tuple[str, ...]) -> nnx.State:
    """Layer-wise LR decay: block ``i`` (0 = bottom) gets ``decay ** (L - i)``, the embeddings
    ``decay ** (L + 1)``, the head and the backbone's top 1."""
    flat = []
    for path, var in nnx.to_flat_state(params):
        x = var.get_value()
        if is_stacked(var):
            scale = decay ** (total - jnp.arange(total, dtype=jnp.float32))
            scale = scale.reshape((total,) + (1,) * (x.ndim - 1))
        else:
            scale = jnp.asarray(decay ** (total + 1) if is_bottom(tuple(path), below) else 1.0,
                                jnp.float32)
        flat.append((path, var.replace(scale)))
    return nnx.from_flat_state(flat)
