"""Block-wise weight quantisation for QLoRA: int8 (absmax) and NF4 (QLoRA's 4-bit NormalFloat).

A kernel ``[..., in, out]`` is cut into blocks of ``block_size`` rows along its input axis; each
block and output column has one float32 absmax scale. int8 stores ``round(127 w / absmax)``; NF4
stores the index of the nearest of 16 normal-quantile levels of ``w / absmax``, two codes per byte
(packed along the input axis). Bytes per weight: int8 ``1 + 4/B``, NF4 ``1/2 + 4/B`` (vs 4 in
float32). Round-trip error per weight is at most ``absmax/254`` (int8) or half the widest gap
between NF4 levels times ``absmax`` (:data:`NF4_MAX_ERROR`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.peft import surgery

KINDS = ("int8", "nf4")
# The 16 NF4 levels (Dettmers et al. 2023; bitsandbytes' table).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
NF4_MAX_ERROR = float(np.max(np.diff(NF4_LEVELS)) / 2)  # x absmax


class Quantized(nnx.Variable):
    """Frozen quantised storage (codes or scales): never a ``Param``, so never trained."""


def _blocks(w: jax.Array, block_size: int) -> jax.Array:
    *lead, n_in, n_out = w.shape
    return w.reshape(*lead, n_in // block_size, block_size, n_out)


def quantize(w: jax.Array, kind: str, block_size: int) -> tuple[jax.Array, jax.Array]:
    """``(codes, scales)`` of a float kernel ``[..., in, out]``."""
    blocks = _blocks(w.astype(jnp.float32), block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-2)  # [..., in/B, out]
    safe = jnp.where(absmax == 0, 1.0, absmax)[..., None, :]
    x = (blocks / safe).reshape(w.shape)
    if kind == "int8":
        return jnp.round(x * 127).astype(jnp.int8), absmax
    mids = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    codes = jnp.searchsorted(mids, x).astype(jnp.uint8)
    return codes[..., 0::2, :] | (codes[..., 1::2, :] << 4), absmax


def dequantize(codes: jax.Array, scales: jax.Array, kind: str, block_size: int,
               dtype=jnp.float32) -> jax.Array:
    """The float kernel ``[..., in, out]`` back from ``(codes, scales)``."""
    if kind == "int8":
        x = codes.astype(jnp.float32) / 127
    else:
        pairs = jnp.stack([codes & 15, codes >> 4], axis=-2)  # [..., in/2, 2, out]
        idx = pairs.reshape(*codes.shape[:-2], codes.shape[-2] * 2, codes.shape[-1])
        x = jnp.asarray(NF4_LEVELS)[idx]
    w = _blocks(x, block_size) * scales[..., None, :]
    return w.reshape(x.shape).astype(dtype)


class QuantizedKernel(nnx.Module):
    """A frozen kernel kept quantised; calling it dequantises (inside the jitted forward)."""

    def __init__(self, kernel: nnx.Variable, kind: str, block_size: int):
        if kind not in KINDS:
            raise ValueError(f"config.method.qlora.quant={kind!r}; choose from {KINDS}")
        n_in = kernel.get_value().shape[-2]
        if n_in % block_size or (kind == "nf4" and block_size % 2):
            raise ValueError(f"quantisation block size {block_size} must divide the kernel's input "
                             f"size {n_in} (and be even for nf4); set config.method.qlora.block_size")
        self.kind, self.block_size = kind, block_size
        self.dtype = kernel.get_value().dtype
        axes = surgery.axes_of(kernel)
        codes, scales = surgery.compute_like(
            kernel, lambda w: quantize(w, kind, block_size), kernel.get_value(), axes=(axes, axes))
        self.codes = Quantized(codes, logical_axes=axes)
        self.scales = Quantized(scales, logical_axes=axes)

    def __call__(self) -> jax.Array:
        return dequantize(self.codes[...], self.scales[...], self.kind, self.block_size, self.dtype)

    @property
    def num_weights(self) -> int:
        """Elements of the float kernel it stands for (NF4 packs two per byte)."""
        return int(self.codes.get_value().size) * (2 if self.kind == "nf4" else 1)

    @property
    def nbytes(self) -> int:
        return self.codes.get_value().nbytes + self.scales.get_value().nbytes
