"""LoRA+ (Hayou et al. 2024): ``B`` trains at ``ratio x`` the learning rate of ``A``
(``config.method.lora.plus_ratio``; 0 = off).

The ratio is a per-parameter LR scale (``MethodPlan.lr_scale``, the mechanism layer-wise LR decay
uses): it multiplies the whole AdamW update, decoupled weight decay included, exactly as a
``torch.optim.AdamW`` parameter group at ``lr * ratio`` does. The groups are PEFT's
``create_loraplus_optimizer``'s: ``lora_B`` and every parameter that is one-dimensional per layer
(DoRA's magnitude, a trained head's bias) get the ratio, everything else (``lora_A``, a head's
weight) the plain rate. ftjax has no LoRA on embeddings, so PEFT's ``loraplus_lr_embedding`` has
nothing to apply to.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ftjax.peft import freezing
from ftjax.peft.plan import MethodConfigError, MethodPlan


def fast(path: tuple, var: nnx.Variable) -> bool:
    """Whether PEFT's LoRA+ puts this trainable parameter in its ``lr * ratio`` groups."""
    per_layer = var.get_value().ndim - (1 if freezing.is_stacked(var) else 0)
    return path[-1] == "lora_b" or per_layer == 1


def with_ratio(plan: MethodPlan, ratio: float) -> MethodPlan:
    """``plan`` with LoRA+'s LR scales over its trainable state (unchanged when ``ratio`` is 0)."""
    if ratio < 0:
        raise MethodConfigError(f"config.method.lora.plus_ratio={ratio} must be >= 0 (0 = LoRA+ off)")
    if not ratio:
        return plan
    params = nnx.state(plan.model, plan.trainable)
    plan.lr_scale = nnx.from_flat_state([
        (path, var.replace(jnp.asarray(ratio if fast(path, var) else 1.0, jnp.float32)))
        for path, var in nnx.to_flat_state(params)])
    return plan
