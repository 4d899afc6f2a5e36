"""A key/value cache for incremental decoding, stacked like the layers it serves.

``k``/``v`` are ``[L, B, S, K, H]`` (layer axis first, so ``run_layers`` threads one layer's slice
through its scan); ``positions``/``segments`` are ``[B, S]`` and describe every slot for all
layers (segment 0 = empty or padding). New tokens are written at ``index`` for every row at once,
so a left-padded batch fills the same slots and masks come from the usual segment/position rule.
An optional :class:`SharedPrefix` holds slots that come before every row's own and that all rows
see: one copy of a prefix many continuations share (in-context demonstrations), broadcast to the
rows inside each layer's attention instead of stored once per row.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ftjax.models import layers


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SharedPrefix:
    """Keys/values of a prefix every row of a batch continues, held once (not per row)."""
    k: jax.Array  # [L, P, K, H]
    v: jax.Array  # [L, P, K, H]
    positions: jax.Array  # [P] int32
    segments: jax.Array  # [P] int32, 0 = padding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    positions: jax.Array  # [B, S] int32
    segments: jax.Array  # [B, S] int32, 0 = empty/padding
    index: jax.Array  # [] int32, the next slot to write
    shared: SharedPrefix | None = None  # slots before every row's own, seen by all rows

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
        """``[B, 1, T, S]`` mask of the new tokens over every slot (call after ``append``); with a
        shared prefix ``[B, 1, T, P + S]``, the prefix's slots first."""
        own = layers.attention_mask(segments, self.segments, positions, self.positions,
                                    causal=True, sliding_window=sliding_window)
        if self.shared is None:
            return own
        rows = (segments.shape[0], self.shared.segments.shape[0])
        shared = layers.attention_mask(segments, jnp.broadcast_to(self.shared.segments, rows), positions,
                                       jnp.broadcast_to(self.shared.positions, rows), causal=True,
                                       sliding_window=sliding_window)
        return jnp.concatenate([shared, own], axis=-1)

    def per_layer(self) -> "LayerKV":
        """Every layer's slice, stacked: the per-layer input of ``run_layers``."""
        shared = (None, None) if self.shared is None else (self.shared.k, self.shared.v)
        return LayerKV(self.k, self.v, jnp.broadcast_to(self.index, self.k.shape[:1]), *shared)

    def advance(self, updated: "LayerKV", num_new: int) -> "KVCache":
        """The cache holding the layers' ``updated`` keys/values, ``index`` moved past the new tokens."""
        return dataclasses.replace(self, k=updated.k, v=updated.v, index=self.index + num_new)


class LayerKV(NamedTuple):
    """One layer's slice of the cache as an attention module sees it."""
    k: jax.Array  # [B, S, K, H]
    v: jax.Array  # [B, S, K, H]
    index: jax.Array  # [] int32, where the new tokens go
    shared_k: jax.Array | None = None  # [P, K, H]: this layer's SharedPrefix keys, if any
    shared_v: jax.Array | None = None  # [P, K, H]

    def write(self, k: jax.Array, v: jax.Array) -> "LayerKV":
        """This layer's cache with the new ``[B, T, K, H]`` keys/values written at ``index``."""
        return self._replace(k=_put(self.k, k, self.index), v=_put(self.v, v, self.index))

    def keys_values(self) -> tuple[jax.Array, jax.Array]:
        """``[B, P + S, K, H]`` keys and values the new tokens attend to (``mask``'s slot order):
        the shared prefix, broadcast to every row for this layer only, then the rows' own slots."""
        if self.shared_k is None:
            return self.k, self.v
        b = self.k.shape[0]
        return tuple(jnp.concatenate([jnp.broadcast_to(p.astype(x.dtype), (b, *p.shape)), x], axis=1)
                     for p, x in ((self.shared_k, self.k), (self.shared_v, self.v)))


def _put(buf: jax.Array, x: jax.Array, index: jax.Array) -> jax.Array:
    """``buf`` with ``x`` written along axis 1 (the slot axis) from ``index`` on."""
    return jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), index, axis=1)
