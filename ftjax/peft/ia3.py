"""IA3 (Liu et al. 2022): learned rescaling vectors, initialised to ones.

On an attention projection (keys, values) the output is scaled, bias included: ``(x W + b) * l``.
On a feed-forward layer the input is scaled instead: ``(x * l) W + b`` -- for the MLP's down
projection that is the intermediate activation. Both follow PEFT's ``IA3Layer``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.models import layers
from ftjax.peft import surgery
from ftjax.peft.linear import WrappedLinear


class IA3Linear(WrappedLinear):
    """A Linear whose output (or, for feed-forward layers, input) is scaled by ``ia3_l``."""

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
