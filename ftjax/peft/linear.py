"""The frozen base every adapter wrapper extends: a ``layers.Linear`` whose kernel may be quantised.

A wrapper keeps the wrapped layer's ``kernel`` and ``bias`` under their original names, so the
base weights keep their paths (and Hugging Face names) and adapter parameters sit beside them:
``.../q_proj/kernel``, ``.../q_proj/lora_a``. ``merge``/``unmerge`` fold an adapter into the kernel
and back; ``unwrap`` returns a plain ``layers.Linear`` for export.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.models import layers
from ftjax.peft import surgery
from ftjax.peft.quant import QuantizedKernel


class WrappedLinear(nnx.Module):
    """``y = x W + b`` with ``W`` a float ``Param`` or a ``QuantizedKernel``; no adapter by itself.

    A subclass whose adapter cannot fold into the kernel sets ``mergeable = False``; one that can
    implements ``merged_weights``/``unmerged_weights``. For PEFT export it defines
    ``peft_tensors``/``load_peft_tensors`` (see ``ftjax.peft.registry``).
    """

    mergeable = True  # the bare wrapper (a quantised base layer) unwraps to its own weights

    def __init__(self, base: layers.Linear):
        self.in_features, self.out_features, self.dtype = base.in_features, base.out_features, base.dtype
        self.kernel = base.kernel
        self.bias = base.bias
        self.merged = False

    @property
    def quantized(self) -> bool:
        return isinstance(self.kernel, QuantizedKernel)

    def quantize(self, kind: str, block_size: int) -> None:
        """Store the (frozen) kernel quantised from now on."""
        self.kernel = QuantizedKernel(self.kernel, kind, block_size)

    def weight(self) -> jax.Array:
        """The float kernel (dequantised if stored quantised), in the compute dtype."""
        w = self.kernel() if self.quantized else self.kernel[...]
        return w.astype(self.dtype)

    def add_bias(self, y: jax.Array) -> jax.Array:
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        return self.add_bias(jnp.einsum("...i,io->...o", x, self.weight()))

    # --- merging: subclasses say how the adapter changes (kernel, bias) ---------------------

    def merged_weights(self) -> tuple[jax.Array, jax.Array | None]:
        """(kernel, bias) with the adapter folded in (all leading/stacked axes included)."""
        bias = None if self.bias is None else self.bias[...]
        return (self.kernel() if self.quantized else self.kernel[...]), bias

    def unmerged_weights(self) -> tuple[jax.Array, jax.Array | None]:
        """Inverse of ``merged_weights`` applied to the current (merged) kernel and bias."""
        raise NotImplementedError(f"{type(self).__name__} cannot be unmerged")

    def _set(self, kernel: jax.Array, bias: jax.Array | None) -> None:
        self.kernel.set_value(kernel.astype(self.kernel.get_value().dtype))
        if bias is not None:
            self.bias.set_value(bias.astype(self.bias.get_value().dtype))

    def merge(self) -> None:
        """Fold the adapter into the kernel in place; the forward then skips the adapter."""
        if self.quantized:
            raise ValueError("cannot merge into a quantised kernel; use unwrap() (dequantises)")
        if not self.merged:
            self._set(*self.merged_weights())
            self.merged = True

    def unmerge(self) -> None:
        """Undo ``merge``: restore the base kernel (up to rounding) and use the adapter again."""
        if self.merged:
            self._set(*self.unmerged_weights())
            self.merged = False

    def unwrap(self) -> layers.Linear:
        """A plain ``layers.Linear`` holding the merged (and dequantised) weights."""
        kernel, bias = (self.kernel[...], None if self.bias is None else self.bias[...]) \
            if self.merged else self.merged_weights()
        axes = (surgery.axes_of(self.kernel.codes) if self.quantized else surgery.axes_of(self.kernel))
        out = nnx.eval_shape(lambda: layers.Linear(
            1, 1, axes=(None, None), use_bias=self.bias is not None, dtype=self.dtype,
            rngs=nnx.Rngs(0)))
        out.in_features, out.out_features = self.in_features, self.out_features
        out.kernel = nnx.Param(kernel, logical_axes=axes)
        if self.bias is not None:
            out.bias = nnx.Param(bias, logical_axes=surgery.axes_of(self.bias))
        return out
