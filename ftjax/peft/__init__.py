"""Fine-tuning methods as transformations of a model and of its trainable-parameter filter.

``apply_method(model, config.method)`` returns a :class:`MethodPlan`: the (possibly rewritten)
model, an nnx filter selecting what trains, and optional per-step masks and per-parameter LR
scales. The train step never changes per method; frozen parameters are simply not in the
trainable state, so they get no gradients and no optimizer state.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import ml_collections
import numpy as np
from flax import nnx

from ftjax.models import layers
from ftjax.models.registry import count_params
from ftjax.peft import freezing, prompt, quant, surgery
from ftjax.peft.adapters import TARGETS as ADAPTER_TARGETS, BottleneckLinear
from ftjax.peft.config import method_config
from ftjax.peft.ia3 import IA3Linear
from ftjax.peft.linear import WrappedLinear
from ftjax.peft.lora import LoRALinear

METHODS = ("full", "head", "partial", "gradual", "llrd", "lora", "dora", "qlora", "houlsby",
           "pfeiffer", "ia3", "prefix", "prompt", "bitfit")
ADAPTER_METHODS = ("lora", "dora", "qlora", "houlsby", "pfeiffer", "ia3", "prefix", "prompt")


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


def train_head(model: nnx.Module, method_cfg: ml_collections.ConfigDict) -> bool:
    """Whether the task head trains alongside the method: ``auto`` = unless it is an LM head."""
    choice = str(method_cfg.train_head).lower()
    if choice not in ("auto", "true", "false"):
        raise ValueError(f"config.method.train_head={choice!r}; choose auto, true or false")
    if choice == "auto":
        return not hasattr(model, "lm_head")
    return choice == "true"


def _wrap_linears(model: nnx.Module, pattern: str, make: Callable[[tuple, layers.Linear], Any],
                  what: str) -> list[tuple]:
    found = surgery.find(model, layers.Linear, pattern)
    if not found:
        names = [surgery.path_str(p) for p, _ in surgery.find(model, layers.Linear)]
        raise ValueError(f"{what}: no linear layer matches {pattern!r}; linear layers: {names}")
    for path, lin in found:
        surgery.replace(model, path, make(path, lin))
    return [p for p, _ in found]


def _adapter_filter(model: nnx.Module, with_head: bool) -> Callable:
    """Parameters the method added (not those of the original model), plus the head if asked."""
    return freezing.params_where(
        lambda p, v: (with_head and freezing.is_head(p) and p[0] not in _VIRTUAL)
        or p[-1] in _ADAPTER_PARAMS or p[0] in _VIRTUAL)


_ADAPTER_PARAMS = ("lora_a", "lora_b", "magnitude", "ia3_l", "adapter_down", "adapter_down_bias",
                   "adapter_up", "adapter_up_bias")
_VIRTUAL = prompt.VIRTUAL


def _prompt_init_ids(tokenizer: Any, text: str) -> np.ndarray | None:
    if not text:
        return None
    if tokenizer is None:
        raise ValueError("config.method.prompt.init_text needs a tokenizer")
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"])


def apply_method(model: nnx.Module, method_cfg: ml_collections.ConfigDict,
                 tokenizer: Any = None) -> MethodPlan:
    """Transform ``model`` (in place) for ``config.method`` and say what trains."""
    kind, m = method_cfg.kind, method_cfg
    if kind not in METHODS:
        raise ValueError(f"config.method.kind={kind!r}; choose from {METHODS}")
    head = train_head(model, m)
    keys = surgery.keys(m.seed)
    if kind == "full":
        return MethodPlan(model, nnx.Param)
    if kind == "head":
        return MethodPlan(model, freezing.head_filter(model))
    if kind == "bitfit":
        return MethodPlan(model, freezing.bitfit_filter(model, head))
    if kind in ("partial", "gradual", "llrd"):
        total = freezing.num_layers(model)
        if kind == "llrd":
            plan = MethodPlan(model, nnx.Param)
            plan.lr_scale = freezing.llrd_scales(nnx.state(model, nnx.Param), total, m.llrd.decay)
            return plan
        if kind == "partial":
            top, every = m.partial.top_blocks, 0
            trainable = freezing.partial_filter(head, top, m.partial.patterns)
        else:
            top, every = m.gradual.start_blocks, m.gradual.every_steps
            if every < 1:
                raise ValueError(f"config.method.gradual.every_steps={every} must be >= 1")
            trainable = freezing.params_where(lambda p, v: head or not freezing.is_head(p))
        mask = freezing.top_blocks_mask_fn(total, top, every) if top > 0 or every else None
        if not any(True for _ in nnx.to_flat_state(nnx.state(model, trainable))):
            raise ValueError(f"method {kind!r} leaves nothing to train; set "
                             "config.method.partial.top_blocks or .patterns")
        return MethodPlan(model, trainable, grad_mask_fn=mask)
    if kind in ("lora", "dora", "qlora"):
        lo = m.lora
        targets = set(_wrap_linears(
            model, lo.targets, lambda p, lin: LoRALinear(lin, rank=lo.rank, alpha=lo.alpha,
                                                         rslora=lo.rslora, dora=kind == "dora",
                                                         key=next(keys)), kind))
        if kind == "qlora":
            for path, lin in surgery.find(model, (layers.Linear, WrappedLinear)):
                if not freezing.is_stacked(lin.kernel):
                    continue
                if path not in targets:
                    lin = WrappedLinear(lin)
                    surgery.replace(model, path, lin)
                lin.quantize(m.qlora.quant, m.qlora.block_size)
    elif kind in ("houlsby", "pfeiffer"):
        a = m.adapter
        def make(path, lin):
            size = a.size or max(1, lin.out_features // a.reduction_factor)
            return BottleneckLinear(lin, size=size, activation=a.activation, key=next(keys))
        _wrap_linears(model, a.targets or ADAPTER_TARGETS[kind], make, kind)
    elif kind == "ia3":
        ff = m.ia3.feedforward
        _wrap_linears(model, m.ia3.targets, lambda p, lin: IA3Linear(
            lin, feedforward=bool(re.search(ff, surgery.path_str(p))), key=next(keys)), kind)
    elif kind == "prompt":
        prompt.add_prompt(model, m.prompt.num_virtual_tokens, key=next(keys),
                          init_ids=_prompt_init_ids(tokenizer, m.prompt.init_text))
    elif kind == "prefix":
        prompt.add_prefix(model, m.prefix.num_virtual_tokens, key=next(keys),
                          projection=m.prefix.projection)
    return MethodPlan(model, _adapter_filter(model, head))


def wrapped_linears(model: nnx.Module) -> list[tuple[tuple, WrappedLinear]]:
    return surgery.find(model, WrappedLinear)


def merge(model: nnx.Module) -> nnx.Module:
    """Fold LoRA/DoRA/IA3 adapters into their kernels in place (the forward skips them)."""
    for _, lin in wrapped_linears(model):
        lin.merge()
    return model


def unmerge(model: nnx.Module) -> nnx.Module:
    """Undo :func:`merge`."""
    for _, lin in wrapped_linears(model):
        lin.unmerge()
    return model


def total_weights(model: nnx.Module) -> int:
    """Parameters of the model as a float model would count them (quantised kernels included)."""
    quantized = sum(m.num_weights for _, m in nnx.iter_graph(model)
                    if isinstance(m, quant.QuantizedKernel))
    return count_params(model) + quantized


def merge_and_unload(model: nnx.Module) -> nnx.Module:
    """The plain model (every wrapper replaced by a ``layers.Linear`` holding merged, dequantised
    weights), ready for ``save_pretrained``; virtual tokens and bottleneck adapters cannot merge."""
    if prompt.has_virtual_tokens(model) or surgery.find(model, BottleneckLinear):
        raise ValueError("prompt/prefix tuning and bottleneck adapters cannot be merged into the "
                         "base weights; export them with export_peft (prompt/prefix) or keep "
                         "the adapter model")
    for path, lin in wrapped_linears(model):
        surgery.replace(model, path, lin.unwrap())
    return model


from ftjax.peft.peft_format import export_peft, import_peft, method_from_peft  # noqa: E402  (needs apply_method)

__all__ = ["METHODS", "MethodPlan", "apply_method", "total_weights", "export_peft", "import_peft", "merge",
           "merge_and_unload", "method_config", "method_from_peft", "unmerge"]
