"""Device side of continuous batching: one KV cache row per decode slot, each at its own length.

``prefill`` runs a new prompt alone (its own jitted call, one compile per prompt bucket) and
``insert`` copies its keys/values into a free slot; ``step`` advances every slot by one token in
one jitted call. The model's ``KVCache`` writes all rows at one index, so ``step`` maps the
forward over slots (``jax.vmap``): each slot writes at its own length and attends to its own
positions/segments, so a row decodes exactly as it would alone. ``resize`` grows the slot
cache by shape buckets (slots and length, powers of two), so compiles stay bounded.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.generate.decode import cache_dims, last_logits
from ftjax.generate.sampling import SamplingArrays, sample
from ftjax.models.kv_cache import KVCache
from ftjax.serve.multi_lora import adapter_rows

TRACES: dict[str, int] = {"prefill": 0, "step": 0}  # how often each jitted call was traced


class Slots(NamedTuple):
    """The KV cache of every slot: ``k``/``v [L, N, S, K, H]``, ``positions``/``segments [N, S]``."""
    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segments: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        """(slots, length)."""
        return self.segments.shape


def empty(cfg, slots: int, length: int) -> Slots:
    """An all-empty cache of ``slots`` rows of ``length`` for a decoder config ``cfg``."""
    num_layers, kv_heads, head_dim = cache_dims(cfg)
    cache = KVCache.zeros(num_layers, slots, length, kv_heads, head_dim, dtype=jnp.dtype(cfg.dtype))
    return Slots(cache.k, cache.v, cache.positions, jnp.zeros_like(cache.segments))  # 2 buffers


@partial(jax.jit, static_argnames=("graphdef",))
def prefill(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array,
            adapter: jax.Array, params: SamplingArrays) -> tuple[jax.Array, KVCache]:
    """The first token ``[1]`` of the left-padded prompt ``ids [1, T]`` and its ``[L, 1, T]`` cache."""
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    mask = mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    num_layers, kv_heads, head_dim = cache_dims(model.model.cfg)
    cache = KVCache.zeros(num_layers, 1, ids.shape[1], kv_heads, head_dim,
                          dtype=jnp.dtype(model.model.cfg.dtype))
    with adapter_rows(adapter):
        logits, cache = last_logits(model, ids, positions, mask, cache)
    return sample(logits, jnp.int32(0), params), cache


@partial(jax.jit, donate_argnames=("slots",))
def insert(slots: Slots, cache: KVCache, slot: jax.Array) -> Slots:
    """``slots`` with row ``slot`` holding the prefilled ``cache`` (the rest of the row empty)."""
    t, zero = cache.segments.shape[1], jnp.int32(0)
    k = jax.lax.dynamic_update_slice(slots.k, cache.k.astype(slots.k.dtype), (zero, slot, zero, zero, zero))
    v = jax.lax.dynamic_update_slice(slots.v, cache.v.astype(slots.v.dtype), (zero, slot, zero, zero, zero))
    row = lambda x: jnp.zeros((1, slots.shape[1]), jnp.int32).at[:, :t].set(x)  # noqa: E731
    return Slots(k, v, jax.lax.dynamic_update_slice(slots.positions, row(cache.positions), (slot, zero)),
                 jax.lax.dynamic_update_slice(slots.segments, row(cache.segments), (slot, zero)))


@partial(jax.jit, static_argnames=("slots", "length"))
def resize(cache: Slots, *, slots: int, length: int) -> Slots:
    """The cache padded (or cut) to ``slots`` rows of ``length``; the rows' contents are kept."""
    n, s = cache.shape

    def fit(x, slot_axis, len_axis):
        x = jax.lax.slice_in_dim(x, 0, min(n, slots), axis=slot_axis)
        x = jax.lax.slice_in_dim(x, 0, min(s, length), axis=len_axis)
        pad = [(0, 0)] * x.ndim
        pad[slot_axis], pad[len_axis] = (0, slots - x.shape[slot_axis]), (0, length - x.shape[len_axis])
        return jnp.pad(x, pad)

    return Slots(fit(cache.k, 1, 2), fit(cache.v, 1, 2), fit(cache.positions, 0, 1),
                 fit(cache.segments, 0, 1))


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def step(graphdef: nnx.GraphDef, state: nnx.State, cache: Slots, tokens: jax.Array,
         positions: jax.Array, lengths: jax.Array, adapters: jax.Array, steps: jax.Array,
         params: SamplingArrays) -> tuple[jax.Array, Slots]:
    """Feed every slot's last token (``tokens``, ``positions``, cache ``lengths``, ``adapters``:
    ``[N]``) and draw each slot's next one (its ``steps``-th draw); free slots decode a dummy."""
    TRACES["step"] += 1
    model = nnx.merge(graphdef, state)

    def row(tok, pos, length, adapter, k, v, cpos, cseg):
        kv = KVCache(k[:, None], v[:, None], cpos[None], cseg[None], length)
        with adapter_rows(adapter[None]):
            logits, kv = last_logits(model, tok[None, None], pos[None, None],
                                     jnp.ones((1, 1), jnp.int32), kv)
        return logits[0], kv.k[:, 0], kv.v[:, 0], kv.positions[0], kv.segments[0]

    logits, k, v, cpos, cseg = jax.vmap(row, in_axes=(0, 0, 0, 0, 1, 1, 0, 0),
                                        out_axes=(0, 1, 1, 0, 0))(
        tokens, positions, lengths, adapters, *cache)
    return sample(logits, steps, params), Slots(k, v, cpos, cseg)
