"""Device side of continuous batching: one KV cache row per decode slot, on one shared timeline.

Every row writes its next token at the same column, ``index`` (the step counter modulo the
cache length ``S``), so ``step`` is the model's ordinary batched decode step: one forward over
``[n, 1]`` tokens with per-row positions, exactly like ``ftjax.generate.decode``'s loop (no
``vmap``, no per-row scatter). A row's own columns are told apart by their segment ids and
positions, not by where they sit (attention masks by segment and position only), so the cache is
a ring: ``insert`` places a prefilled prompt of ``T`` columns just before ``index`` (wrapping), and
a row is safe as long as its prompt plus its new tokens fit in ``S``. ``step`` runs over the first
``n`` rows only (``n``: a bucket of the live row count; the batcher keeps its live rows at the
front with ``move``), so the work follows the load, one compile per bucket. ``resize`` unrolls
the ring and grows it by length buckets (powers of two).
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
def insert(slots: Slots, cache: KVCache, slot: jax.Array, index: jax.Array) -> Slots:
    """``slots`` with row ``slot`` holding the prefilled ``cache`` in the ``T`` columns before
    ``index`` (wrapping round the ring); the rest of the row is empty."""
    t, length = cache.segments.shape[1], slots.shape[1]
    shift = jnp.mod(index - t, length)

    def row(buf, x, axis):  # x's T columns at [0, T) of a zero row, rolled to end before index
        full = jnp.zeros(buf.shape[:axis - 1] + (1, length) + buf.shape[axis + 1:], buf.dtype)
        full = jax.lax.dynamic_update_slice_in_dim(full, x.astype(buf.dtype), 0, axis=axis)
        start = [jnp.int32(0)] * buf.ndim
        start[axis - 1] = slot
        return jax.lax.dynamic_update_slice(buf, jnp.roll(full, shift, axis=axis), start)

    return Slots(row(slots.k, cache.k, 2), row(slots.v, cache.v, 2),
                 row(slots.positions, cache.positions, 1), row(slots.segments, cache.segments, 1))


@partial(jax.jit, donate_argnames=("slots",))
def move(slots: Slots, source: jax.Array, dest: jax.Array) -> Slots:
    """``slots`` with row ``source`` copied into row ``dest`` (rows share one timeline, so a row
    means the same wherever it sits)."""
    def put(buf, axis):
        start = [jnp.int32(0)] * buf.ndim
        start[axis] = dest
        return jax.lax.dynamic_update_slice(
            buf, jax.lax.dynamic_slice_in_dim(buf, source, 1, axis=axis), start)

    return Slots(put(slots.k, 1), put(slots.v, 1), put(slots.positions, 0), put(slots.segments, 0))


@partial(jax.jit, static_argnames=("length",))
def resize(cache: Slots, index: jax.Array, *, length: int) -> Slots:
    """The cache unrolled (the column at ``index``, the oldest, first) and padded to ``length``
    >= its own; the next write goes at column ``S`` (the old length)."""
    def fit(x, axis):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, length - x.shape[axis])
        return jnp.pad(jnp.roll(x, -index, axis=axis), pad)

    return Slots(fit(cache.k, 2), fit(cache.v, 2), fit(cache.positions, 1), fit(cache.segments, 1))


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def step(graphdef: nnx.GraphDef, state: nnx.State, cache: Slots, index: jax.Array,
         tokens: jax.Array, positions: jax.Array, adapters: jax.Array, steps: jax.Array,
         params: SamplingArrays) -> tuple[jax.Array, Slots]:
    """Feed the first ``n`` slots' last tokens (``tokens``, ``positions``, ``adapters``: ``[n]``),
    written at column ``index``, and draw each one's next token (its ``steps``-th draw); rows past
    the live ones decode a dummy. Rows from ``n`` on are left as they are."""
    TRACES["step"] += 1
    model = nnx.merge(graphdef, state)
    n = tokens.shape[0]
    rows = KVCache(cache.k[:, :n], cache.v[:, :n], cache.positions[:n], cache.segments[:n], index)
    with adapter_rows(adapters):
        logits, rows = last_logits(model, tokens[:, None], positions[:, None],
                                   jnp.ones((n, 1), jnp.int32), rows)
    zero = jnp.int32(0)
    cache = Slots(jax.lax.dynamic_update_slice(cache.k, rows.k, (zero,) * 5),
                  jax.lax.dynamic_update_slice(cache.v, rows.v, (zero,) * 5),
                  jax.lax.dynamic_update_slice(cache.positions, rows.positions, (zero, zero)),
                  jax.lax.dynamic_update_slice(cache.segments, rows.segments, (zero, zero)))
    return sample(logits, steps, params), cache
