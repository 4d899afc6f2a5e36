"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): a Hadamard product of two low-rank updates.

``dW = s (W1a W1b) * (W2a W2b)`` with ``W?a [out, r]``, ``W?b [r, in]`` (PEFT's orientation, so the
tensors export as they are; the kernel update is ``dW`` transposed) and ``s = alpha / r``. PEFT's
init: ``W1a, W1b, W2a`` kaiming-uniform, ``W2b = 0``, so a fresh adapter changes nothing. The rank
of ``dW`` reaches ``r^2`` for ``4 r (in + out) / 2`` parameters, twice LoRA's at the same ``r``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ftjax.models import layers
from ftjax.peft import registry, surgery
from ftjax.peft.delta import DeltaLinear, kaiming_bound, lycoris_from_peft, lycoris_peft_config
from ftjax.peft.lora import TARGETS, LoRAScale
from ftjax.peft.plan import Context, MethodPlan, adapter_plan

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")  # PEFT's tensor names


class LoHaLinear(DeltaLinear):
    """A Linear with a LoHa update; stacked like the kernel it adapts."""

    def __init__(self, base: layers.Linear, *, rank: int, alpha: float, key: jax.Array):
        super().__init__(base)
        if rank < 1:
            raise ValueError(f"config.method.loha.rank={rank} must be >= 1")
        kernel = base.kernel
        lead_shape, lead_axes = surgery.lead(kernel, 2)
        in_axis, out_axis = surgery.axes_of(kernel)[-2:]
        self.rank = rank
        self.scaling = surgery.new_param(kernel, surgery.constant(alpha / rank), lead_shape,
                                         lead_axes, key, dtype=jnp.float32, cls=LoRAScale)
        keys = jax.random.split(key, 3)
        a_shape, a_axes = lead_shape + (self.out_features, rank), lead_axes + (out_axis, "lora_rank")
        b_shape, b_axes = lead_shape + (rank, self.in_features), lead_axes + ("lora_rank", in_axis)
        self.hada_w1_a = surgery.new_param(kernel, surgery.uniform(kaiming_bound(rank)),
                                           a_shape, a_axes, keys[0])
        self.hada_w1_b = surgery.new_param(kernel, surgery.uniform(kaiming_bound(self.in_features)),
                                           b_shape, b_axes, keys[1])
        self.hada_w2_a = surgery.new_param(kernel, surgery.uniform(kaiming_bound(rank)),
                                           a_shape, a_axes, keys[2])
        self.hada_w2_b = surgery.new_param(kernel, surgery.constant(0.0), b_shape, b_axes, key)

    def delta(self) -> jax.Array:
        w1a, w1b, w2a, w2b = (getattr(self, n)[...].astype(jnp.float32) for n in FACTORS)
        prod = jnp.einsum("...or,...ri->...io", w1a, w1b) * jnp.einsum("...or,...ri->...io", w2a, w2b)
        return self.scaling[...][..., None, None] * prod


def _apply(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    lo = m.loha
    surgery.wrap_linears(model, layers.Linear, lo.targets, lambda p, lin: LoHaLinear(
        lin, rank=lo.rank, alpha=lo.alpha, key=next(ctx.keys)), "loha")
    return adapter_plan(model, ctx)


def _peft_config(model: nnx.Module, m: ml_collections.ConfigDict, found: list,
                 regex: Callable[[list], str]) -> dict[str, Any]:
    return lycoris_peft_config(found, m.loha, regex)


def _from_peft(config: dict, select: Callable[[Any], str]) -> dict[str, Any]:
    return dict(kind="loha", loha=lycoris_from_peft(config, select))


registry.register(registry.Method(
    "loha", _apply, mergeable=True, peft=registry.PeftFormat("LOHA", _peft_config, _from_peft),
    defaults={"loha": dict(rank=8, alpha=8.0, targets=TARGETS)}))  # PEFT's r and alpha defaults
