"""Prefill plus a compiled decode loop in one jit: no host round trip per token.

The prompt batch is left-padded; positions come from the mask, so every row continues at its own
position while all rows write the same cache slot. The loop (``lax.while_loop``) stops when every
row has hit a stop token or its own ``max_new`` budget. An optional host callback sees each
step's tokens (streaming, stop strings) and may end rows early.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from ftjax.generate.sampling import SamplingArrays, sample
from ftjax.models.kv_cache import KVCache

# on_step(step, tokens [B]) -> [B] bool: rows the host wants to end now.
StepCallback = Callable[[np.ndarray, np.ndarray], np.ndarray]


def cache_dims(cfg) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config of any family."""
    heads = getattr(cfg, "num_kv_heads", cfg.num_heads)
    head_dim = (getattr(cfg, "resolved_head_dim", None) or getattr(cfg, "head_dim", None)
                or cfg.hidden_size // cfg.num_heads)
    return cfg.num_layers, heads, head_dim


def last_logits(model: nnx.Module, ids: jax.Array, positions: jax.Array, segments: jax.Array,
             cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Last-position logits ``[B, V]`` in float32 and the extended cache."""
    h, cache = model.model(ids, positions=positions, segment_ids=segments, cache=cache)
    return model.logits(h[:, -1]).astype(jnp.float32), cache


@partial(jax.jit, static_argnames=("graphdef", "cache_len", "on_step"))
def decode(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array,
           max_new: jax.Array, params: SamplingArrays, stop_ids: jax.Array, *, cache_len: int,
           on_step: StepCallback | None = None) -> tuple[jax.Array, jax.Array]:
    """Continue left-padded ``ids [B, T]`` (``mask`` 1 = token) by up to ``cache_len - T`` tokens.

    ``max_new [B]`` caps each row; ``stop_ids [B, N]`` (padded with -1) end a row and are kept as
    its last token. Returns ``(tokens [B, cache_len - T], lengths [B])``.
    """
    model = nnx.merge(graphdef, state)
    b, t = ids.shape
    steps = cache_len - t
    mask = mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    num_layers, kv_heads, head_dim = cache_dims(model.model.cfg)
    cache = KVCache.zeros(num_layers, b, cache_len, kv_heads, head_dim,
                          dtype=jnp.dtype(model.model.cfg.dtype))
    logits, cache = last_logits(model, ids, positions, mask, cache)

    def emit(step, tok, done, lengths, out):
        """Record ``tok`` for the live rows (finished rows get -1) and update who is done."""
        tok = jnp.where(done, -1, tok)
        lengths = lengths + (~done).astype(jnp.int32)
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], step, axis=1)
        done = done | jnp.any(tok[:, None] == stop_ids, axis=-1) | (lengths >= max_new)
        if on_step is not None:
            done = done | io_callback(on_step, jax.ShapeDtypeStruct((b,), jnp.bool_), step, tok)
        return done, lengths, out

    done, lengths, out = emit(0, sample(logits, jnp.int32(0), params), max_new <= 0,
                              jnp.zeros((b,), jnp.int32), jnp.full((b, steps), -1, jnp.int32))

    def cond(carry):
        step, _, _, done, _, _, _ = carry
        return (step < steps) & ~jnp.all(done)

    def body(carry):
        step, tok, pos, done, lengths, out, cache = carry
        feed = jnp.maximum(tok, 0)[:, None]  # finished rows (-1) keep decoding a dummy token
        logits, cache = last_logits(model, feed, pos[:, None], jnp.ones((b, 1), jnp.int32), cache)
        tok = sample(logits, step, params)
        done, lengths, out = emit(step, tok, done, lengths, out)
        return step + 1, tok, pos + 1, done, lengths, out, cache

    carry = (jnp.int32(1), out[:, 0], positions[:, -1] + 1, done, lengths, out, cache)
    _, _, _, _, lengths, out, _ = jax.lax.while_loop(cond, body, carry)
    return out, lengths
