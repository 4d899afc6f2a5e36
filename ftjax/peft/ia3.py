"""IA3 (Liu et al. 2022): learned rescaling vectors, initialised to ones.

On an attention projection (keys, values) the output is scaled, bias included: ``(x W + b) * l``.
On a feed-forward layer the input is scaled instead: ``(x * l) W + b`` -- for the MLP's down
projection that is the intermediate activation. Both follow PEFT's ``IA3Layer``.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ftjax.models import layers, registry as families
from ftjax.peft import registry, surgery
from ftjax.peft.linear import WrappedLinear
from ftjax.peft.plan import Context, MethodPlan, adapter_plan


class IA3Linear(WrappedLinear):
    """A Linear whose output (or, for feed-forward layers, input) is scaled by ``ia3_l``."""

    mergeable = True

    def __init__(self, base: layers.Linear, *, feedforward: bool, key: jax.Array):
        super().__init__(base)
        self.feedforward = feedforward
        lead_shape, lead_axes = surgery.lead(base.kernel, 2)
        in_axis, out_axis = surgery.axes_of(base.kernel)[-2:]
        size, axis = (self.in_features, in_axis) if feedforward else (self.out_features, out_axis)
        self.ia3_l = surgery.new_param(base.kernel, surgery.constant(1.0), lead_shape + (size,),
                                       lead_axes + (axis,), key)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.merged:
            return super().__call__(x)
        scale = self.ia3_l[...].astype(self.dtype)
        if self.feedforward:
            return super().__call__(x.astype(self.dtype) * scale)
        return super().__call__(x) * scale

    def _scaled(self, power: float) -> tuple[jax.Array, jax.Array | None]:
        w, bias = WrappedLinear.merged_weights(self) if power > 0 else (
            self.kernel[...], None if self.bias is None else self.bias[...])
        scale = self.ia3_l[...].astype(jnp.float32) ** power
        if self.feedforward:
            return w * scale[..., :, None], bias
        return w * scale[..., None, :], None if bias is None else bias * scale

    def merged_weights(self) -> tuple[jax.Array, jax.Array | None]:
        return self._scaled(1.0)

    def unmerged_weights(self) -> tuple[jax.Array, jax.Array | None]:
        return self._scaled(-1.0)

    def peft_tensors(self) -> dict[str, np.ndarray]:
        """PEFT's ``ia3_l``: ``[1, in]`` on a feed-forward layer, ``[out, 1]`` otherwise."""
        l = surgery.host(self.ia3_l)
        return {"ia3_l": l[..., None, :] if self.feedforward else l[..., :, None]}

    def load_peft_tensors(self, read: Callable[[str, Callable], np.ndarray]) -> None:
        surgery.assign(self.ia3_l, read("ia3_l", np.ravel))


def _apply(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    family = families.family_of(model)
    ff = m.ia3.feedforward or family.ia3_feedforward
    surgery.wrap_linears(model, layers.Linear, m.ia3.targets or family.ia3_targets, lambda p, lin: IA3Linear(
        lin, feedforward=bool(re.search(ff, surgery.path_str(p))), key=next(ctx.keys)), "ia3")
    return adapter_plan(model, ctx)


def _peft_config(model: nnx.Module, m: ml_collections.ConfigDict, found: list,
                 regex: Callable[[list], str]) -> dict[str, Any]:
    ff = [p for p, lin in found if lin.feedforward]
    return dict(target_modules=regex([p for p, _ in found]), fan_in_fan_out=False,
                feedforward_modules=regex(ff) if ff else [], init_ia3_weights=True)


def _from_peft(config: dict, select: Callable[[Any], str]) -> dict[str, Any]:
    return dict(kind="ia3", ia3=dict(targets=select(config["target_modules"]),
                                     feedforward=select(config.get("feedforward_modules"))))


registry.register(registry.Method(
    "ia3", _apply, mergeable=True, peft=registry.PeftFormat("IA3", _peft_config, _from_peft),
    defaults={"ia3": dict(targets="", feedforward="")}))  # regexes; "" = the family's default
