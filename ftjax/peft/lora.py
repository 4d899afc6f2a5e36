"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024) on a Linear.

``y = x W + b + s (x A) B`` with ``A [in, r]`` uniform(+-1/sqrt(in)) (PEFT's kaiming default),
``B [r, out] = 0`` so a fresh adapter changes nothing, and ``s = alpha / r`` (rsLoRA:
``alpha / sqrt(r)``). DoRA learns a per-output-column magnitude ``m`` (initialised to the column
norms of ``W``) and rescales the adapted weight to it: ``y = (m / ||W + s A B||) (x W + s x A B) + b``,
the norm treated as a constant in the backward pass, as in the paper and PEFT.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.models import layers
from ftjax.peft import surgery
from ftjax.peft.linear import WrappedLinear


def column_norm(w: jax.Array) -> jax.Array:
    """L2 norm of each output column of a kernel ``[..., in, out]`` -> ``[..., out]``."""
    return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=-2))


class LoRAScale(nnx.Variable):
    """The LoRA scale ``s`` (one per stacked layer): frozen state rather than a Python constant,
    so sweep arms that differ only in ``alpha`` run the same compiled step."""


class LoRALinear(WrappedLinear):
    """A Linear with a low-rank update (optionally DoRA); stacked like the kernel it adapts."""

    def __init__(self, base: layers.Linear, *, rank: int, alpha: float, rslora: bool = False,
                 dora: bool = False, key: jax.Array):
        super().__init__(base)
        if rank < 1:
            raise ValueError(f"config.method.lora.rank={rank} must be >= 1")
        kernel = base.kernel
        lead_shape, lead_axes = surgery.lead(kernel, 2)
        in_axis, out_axis = surgery.axes_of(kernel)[-2:]
        self.rank = rank
        scale = alpha / (math.sqrt(rank) if rslora else rank)
        self.scaling = surgery.new_param(kernel, surgery.constant(scale), lead_shape, lead_axes,
                                         key, dtype=jnp.float32, cls=LoRAScale)
        self.lora_a = surgery.new_param(kernel, surgery.uniform(1 / math.sqrt(self.in_features)),
                                        lead_shape + (self.in_features, rank),
                                        lead_axes + (in_axis, "lora_rank"), key)
        self.lora_b = surgery.new_param(kernel, surgery.constant(0.0),
                                        lead_shape + (rank, self.out_features),
                                        lead_axes + ("lora_rank", out_axis), key)
        self.magnitude = nnx.data(None)
        if dora:
            norm = surgery.compute_like(kernel, column_norm, kernel.get_value(),
                                        axes=lead_axes + (out_axis,))
            self.magnitude = nnx.Param(norm.astype(surgery.float_dtype(kernel)),
                                       logical_axes=lead_axes + (out_axis,))
        self.merge_scale = nnx.data(None)  # DoRA: the column scale used by merge(), kept for unmerge()

    def delta(self) -> jax.Array:
        """``s A B`` ``[..., in, out]`` (stacked axes included)."""
        a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        return self.scaling[...][..., None, None] * jnp.einsum("...ir,...ro->...io", a, b)

    def dora_scale(self, w: jax.Array) -> jax.Array:
        """``m / ||W + s A B||`` per output column, the norm detached from the gradient."""
        norm = jax.lax.stop_gradient(column_norm(w.astype(jnp.float32) + self.delta()))
        return self.magnitude[...].astype(jnp.float32) / norm

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.merged:
            return super().__call__(x)
        x = x.astype(self.dtype)
        w = self.weight()
        a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
        y = jnp.einsum("...i,io->...o", x, w)
        s = self.scaling[...].astype(self.dtype)  # a scalar here: blocks run one layer at a time
        update = s * jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", x, a), b)
        if self.magnitude is None:
            return self.add_bias(y + update)
        return self.add_bias(self.dora_scale(w).astype(self.dtype) * (y + update))

    def merged_weights(self) -> tuple[jax.Array, jax.Array | None]:
        w, bias = super().merged_weights()
        merged = w.astype(jnp.float32) + self.delta()
        if self.magnitude is not None:
            scale = self.dora_scale(w)
            self.merge_scale = nnx.Variable(scale)
            merged = merged * scale[..., None, :]
        return merged, bias

    def unmerged_weights(self) -> tuple[jax.Array, jax.Array | None]:
        w = self.kernel[...].astype(jnp.float32)
        if self.magnitude is not None:
            w = w / self.merge_scale[...][..., None, :]
            self.merge_scale = None
        return w - self.delta(), None if self.bias is None else self.bias[...]
