"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) after a block's output projection.

An adapter is ``h + up(act(down(h)))`` on the output ``h`` of the attention output projection
and/or the MLP's down projection, before the residual add. Houlsby places one after both,
Pfeiffer only after the MLP. ``up`` starts at zero, so a fresh adapter is the identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ftjax.models import layers, registry as families
from ftjax.peft import registry, surgery
from ftjax.peft.linear import WrappedLinear
from ftjax.peft.plan import Context, MethodPlan, adapter_plan



class BottleneckLinear(WrappedLinear):
    """A Linear followed by a residual bottleneck adapter of width ``size``."""

    mergeable = False  # the adapter is non-linear in the layer's output

    def __init__(self, base: layers.Linear, *, size: int, activation: str, key: jax.Array):
        super().__init__(base)
        if size < 1:
            raise ValueError(f"bottleneck adapter size {size} must be >= 1")
        self.act = layers.activation(activation)
        lead_shape, lead_axes = surgery.lead(base.kernel, 2)
        d, d_axis = self.out_features, surgery.axes_of(base.kernel)[-1]
        like = base.kernel
        self.adapter_down = surgery.new_param(like, surgery.normal(0.02), lead_shape + (d, size),
                                              lead_axes + (d_axis, None), key)
        self.adapter_down_bias = surgery.new_param(like, surgery.constant(0.0), lead_shape + (size,),
                                                   lead_axes + (None,), key)
        self.adapter_up = surgery.new_param(like, surgery.constant(0.0), lead_shape + (size, d),
                                            lead_axes + (None, d_axis), key)
        self.adapter_up_bias = surgery.new_param(like, surgery.constant(0.0), lead_shape + (d,),
                                                 lead_axes + (d_axis,), key)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = super().__call__(x)
        p = lambda v: v[...].astype(self.dtype)
        z = self.act(jnp.einsum("...d,dm->...m", h, p(self.adapter_down)) + p(self.adapter_down_bias))
        return h + jnp.einsum("...m,md->...d", z, p(self.adapter_up)) + p(self.adapter_up_bias)


def _apply(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    a = m.adapter

    def make(path, lin):
        size = a.size or max(1, lin.out_features // a.reduction_factor)
        return BottleneckLinear(lin, size=size, activation=a.activation, key=next(ctx.keys))

    surgery.wrap_linears(model, layers.Linear, a.targets or families.family_of(model).adapter_targets[m.kind], make, m.kind)
    return adapter_plan(model, ctx)


registry.register(registry.Method(
    "houlsby", _apply, defaults={"adapter": dict(
        size=0, reduction_factor=16, activation="relu",  # size 0: D / factor
        targets="")}))  # "" = the variant's placement (houlsby / pfeiffer)
registry.register(registry.Method("pfeiffer", _apply))
