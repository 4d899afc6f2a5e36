"""A key/value cache for incremental decoding, stacked like the layers it serves.

``k``/``v`` are ``[L, B, S, K, H]`` (layer axis first, so ``run_layers`` threads one layer's slice
through its scan); ``positions``/``segments`` are ``[B, S]`` and describe every slot for all
layers (segment 0 = empty or padding). New tokens are written at ``index`` for every row at once,
so a left-padded batch fills the same slots and masks come from the usual segment/position rule.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ftjax.models import layers


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    positions: jax.Array  # [B, S] int32
    segments: jax.Array  # [B, S] int32, 0 = empty/padding
    index: jax.Array  # [] int32, the next slot to write

    @classmethod
    def zeros(cls, num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int,
              dtype=jnp.float32) -> "KVCache":
        """An empty cache of ``length`` slots."""
        shape = (num_layers, batch, length, kv_heads, head_dim)
        slots = jnp.zeros((batch, length), jnp.int32)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), slots, slots,
                   jnp.zeros((), jnp.int32))

    def append(self, positions: jax.Array, segments: jax.Array) -> "KVCache":
        """Record ``T`` new tokens' ``[B, T]`` positions/segments at ``index`` (keys come per layer)."""
        return dataclasses.replace(self, positions=_put(self.positions, positions, self.index),
                                   segments=_put(self.segments, segments, self.index))

    def mask(self, positions: jax.Array, segments: jax.Array,
             sliding_window: int | None = None) -> jax.Array:
        """``[B, 1, T, S]`` mask of the new tokens over every slot (call after ``append``)."""
        return layers.attention_mask(segments, self.segments, positions, self.positions,
                                     causal=True, sliding_window=sliding_window)

    def per_layer(self) -> "LayerKV":
        """Every layer's slice, stacked: the per-layer input of ``run_layers``."""
        return LayerKV(self.k, self.v, jnp.broadcast_to(self.index, self.k.shape[:1]))

    def advance(self, updated: "LayerKV", num_new: int) -> "KVCache":
        """The cache holding the layers' ``updated`` keys/values, ``index`` moved past the new tokens."""
        return dataclasses.replace(self, k=updated.k, v=updated.v, index=self.index + num_new)


class LayerKV(NamedTuple):
    """One layer's slice of the cache as an attention module sees it."""
    k: jax.Array  # [B, S, K, H]
    v: jax.Array  # [B, S, K, H]
    index: jax.Array  # [] int32, where the new tokens go

    def write(self, k: jax.Array, v: jax.Array) -> "LayerKV":
        """This layer's cache with the new ``[B, T, K, H]`` keys/values written at ``index``."""
        return LayerKV(_put(self.k, k, self.index), _put(self.v, v, self.index), self.index)


def _put(buf: jax.Array, x: jax.Array, index: jax.Array) -> jax.Array:
    """``buf`` with ``x`` written along axis 1 (the slot axis) from ``index`` on."""
    return jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), index, axis=1)
