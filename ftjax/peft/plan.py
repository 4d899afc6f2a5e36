"""``apply_method``: run the registered method ``config.method.kind`` names and say what trains.

The result is a :class:`MethodPlan`: the (possibly rewritten) model, an nnx filter selecting what
trains, and optional per-step masks and per-parameter LR scales. The train step never changes per
method; frozen parameters are simply not in the trainable state, so they get no gradients and no
optimizer state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import ml_collections
from flax import nnx

from ftjax.peft import freezing, registry, surgery


@dataclasses.dataclass
class MethodPlan:
    """What a method did to the model and how the optimizer must treat the trainable state."""
    model: nnx.Module
    trainable: Any  # nnx filter
    # mask(tree, step) -> tree: zeroes frozen slices of gradients and of updates (unfreezing).
    grad_mask_fn: Callable[[Any, Any], Any] | None = None
    lr_scale: Any = None  # State of per-parameter LR multipliers (layer-wise decay)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``optim.make_optimizer``."""
        return dict(lr_scale=self.lr_scale, update_mask_fn=self.grad_mask_fn)


@dataclasses.dataclass
class Context:
    """What a method's ``apply`` may need beyond the model and its config section."""
    keys: Iterator[jax.Array]  # independent initialisation keys (config.method.seed)
    train_head: bool  # the task head trains alongside the method
    tokenizer: Any = None


def train_head(model: nnx.Module, method_cfg: ml_collections.ConfigDict) -> bool:
    """Whether the task head trains alongside the method: ``auto`` = unless it is an LM head."""
    choice = str(method_cfg.train_head).lower()
    if choice not in ("auto", "true", "false"):
        raise ValueError(f"config.method.train_head={choice!r}; choose auto, true or false")
    if choice == "auto":
        return not hasattr(model, "lm_head")
    return choice == "true"


def adapter_plan(model: nnx.Module, ctx: Context) -> MethodPlan:
    """The plan of a method that adds parameters: its ``AdapterParam``s train, plus the head if asked."""
    head = ctx.train_head
    return MethodPlan(model, freezing.params_where(
        lambda p, v: isinstance(v, surgery.AdapterParam) or (head and freezing.is_head(p))))


def apply_method(model: nnx.Module, method_cfg: ml_collections.ConfigDict,
                 tokenizer: Any = None) -> MethodPlan:
    """Transform ``model`` (in place) for ``config.method`` and say what trains."""
    method = registry.get(method_cfg.kind)
    ctx = Context(surgery.keys(method_cfg.seed), train_head(model, method_cfg), tokenizer)
    return method.apply(model, method_cfg, ctx)
