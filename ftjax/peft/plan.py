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

from ftjax.errors import FtjaxError
from ftjax.peft import freezing, registry, surgery


class MethodConfigError(FtjaxError, ValueError):
    """A ``config.method`` that cannot work, or a trainer that cannot run the method."""


@dataclasses.dataclass(frozen=True)
class StepHook:
    """A method's own state beyond the parameters, updated inside the jitted train step (AdaLoRA's
    importance scores and rank mask). The state lives in ``TrainState.method_state``, so it is
    sharded, donated and checkpointed with the rest; ``update`` runs after the optimizer."""
    init: Callable[[Any], Any]  # (trainable params) -> the initial state, arrays placed like them
    # (new params, gradients, state, step) -> (params, state); ``step`` is the step just taken
    update: Callable[[Any, Any, Any, jax.Array], tuple[Any, Any]]
    loss: Callable[[Any], jax.Array] | None = None  # (params) -> a term added to the loss


@dataclasses.dataclass
class MethodPlan:
    """What a method did to the model and how the optimizer must treat the trainable state."""
    model: nnx.Module
    trainable: Any  # nnx filter
    # mask(tree, step) -> tree: zeroes frozen slices (unfreezing); the optimizer applies it to
    # the gradients and the updates (optim.make_optimizer's mask_fn).
    grad_mask_fn: Callable[[Any, Any], Any] | None = None
    lr_scale: Any = None  # State of per-parameter LR multipliers (layer-wise decay)
    step_hook: StepHook | None = None  # method state the train step updates (AdaLoRA)

    def refuse_step_hook(self, trainer: str, instead: str) -> None:
        """For a trainer that does not run ``step_hook``: refuse a method that needs it."""
        if self.step_hook is not None:
            raise MethodConfigError(f"{trainer} cannot train this method: it keeps state the train "
                                    f"step updates (AdaLoRA's rank allocation); {instead}")

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``optim.make_optimizer``."""
        return dict(lr_scale=self.lr_scale, mask_fn=self.grad_mask_fn)


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
