"""Option log-likelihoods of many prompts that continue one shared context, the context encoded once.

In-context evaluation puts the same demonstrations before every query (and every content-free
prompt) of a draw. Here they run through the decoder once, into a KV cache prefix
(``kv_cache.SharedPrefix``: one copy, which each layer's attention broadcasts to the rows); each
row then runs only ``[last context token] + prompt + option`` on top of it, and the LM head only at
the option's positions. The context's last token starts every row, so the first option token is
always predicted from a position inside the row, even for an empty prompt.

Shapes stay few: the prefix is padded to a multiple of ``PREFIX_BUCKET`` slots (one length for
every draw of an evaluation), rows are sorted by length and padded to multiples of
``SUFFIX_BUCKET``. Scores equal the full-sequence path's (``loop.choice_log_likelihoods``) up to
float rounding.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ftjax import sharding
from ftjax.generate.decode import cache_dims
from ftjax.models.decoder import Decoder
from ftjax.models.kv_cache import KVCache, SharedPrefix
from ftjax.train import lm_loss

PREFIX_BUCKET = 128
SUFFIX_BUCKET = 16


def supported(model: nnx.Module) -> bool:
    """Whether ``model`` can score on top of a cached prefix: a plain causal LM call
    (``lm_loss.chunkable``: no prompt-tuning tokens) over a decoder backbone with a KV cache."""
    return lm_loss.chunkable(model) and isinstance(model.model, Decoder)


def prefix_slots(context_len: int) -> int:
    """Cache slots for a context of ``context_len`` tokens (all but its last are cached)."""
    return max(1, -(-(context_len - 1) // PREFIX_BUCKET)) * PREFIX_BUCKET


class Context(NamedTuple):
    """An encoded context: its cached prefix, its last token and that token's position."""
    prefix: SharedPrefix
    last_token: int
    position: int


def _empty_cache(model: nnx.Module, rows: int, slots: int) -> KVCache:
    layers, heads, head_dim = cache_dims(model.model.cfg)
    return KVCache.zeros(layers, rows, slots, heads, head_dim, dtype=jnp.dtype(model.model.cfg.dtype))


def _prefill(graphdef: nnx.GraphDef, params: Any, rest: Any, ids: jax.Array,
             segments: jax.Array) -> SharedPrefix:
    model = nnx.merge(graphdef, params, rest)
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None] * segments
    _, cache = model.model(ids, positions=positions, segment_ids=segments,
                           cache=_empty_cache(model, 1, ids.shape[1]))
    return SharedPrefix(cache.k[:, 0], cache.v[:, 0], cache.positions[0], cache.segments[0])


def _row_scores(graphdef: nnx.GraphDef, params: Any, rest: Any, prefix: SharedPrefix,
                batch: dict[str, jax.Array]) -> jax.Array:
    """Summed log-likelihood ``[B, C]`` of each row's option tokens, rows ``[B, C, T]``."""
    model = nnx.merge(graphdef, params, rest)
    b, c, t = batch["input_ids"].shape
    flat = {k: v.reshape(b * c, v.shape[-1]) for k, v in batch.items()}
    cache = dataclasses.replace(_empty_cache(model, b * c, t), shared=prefix)
    h, _ = model.model(flat["input_ids"], positions=flat["positions"],
                       segment_ids=flat["segment_ids"], cache=cache)
    h = jnp.take_along_axis(h, flat["gather"][..., None], axis=1)  # [B*C, O, D]: option positions only
    nll, _ = lm_loss.row_sums(model.logits, h, flat["targets"], flat["weights"])
    return -nll.reshape(b, c)


def suffix_arrays(context: Context, prompts: Sequence[np.ndarray], options: Sequence[Sequence[int]],
                  rows: int, pad_id: int) -> dict[str, np.ndarray]:
    """``[rows, C, T]`` rows ``[last context token] + prompt + option`` at their positions after the
    prefix, and ``[rows, C, O]`` where the option tokens are predicted (``gather``, ``targets``,
    ``weights``); rows past ``len(prompts)`` are padding (segment 0, weight 0)."""
    c, o = len(options), max(len(opt) for opt in options)
    longest = 1 + max(len(p) for p in prompts) + o
    t = -(-longest // SUFFIX_BUCKET) * SUFFIX_BUCKET
    ids = np.full((rows, c, t), pad_id, np.int32)
    seg = np.zeros((rows, c, t), np.int32)
    gather = np.zeros((rows, c, o), np.int32)
    targets = np.zeros((rows, c, o), np.int32)
    weights = np.zeros((rows, c, o), np.float32)
    for i, prompt in enumerate(prompts):
        start = 1 + len(prompt)  # the option's first token's index in the row
        for j, opt in enumerate(options):
            seq = np.concatenate([[context.last_token], prompt, opt])
            ids[i, j, :len(seq)], seg[i, j, :len(seq)] = seq, 1
            gather[i, j, :len(opt)] = start - 1 + np.arange(len(opt))
            targets[i, j, :len(opt)] = opt
            weights[i, j, :len(opt)] = 1.0
    positions = (context.position + np.arange(t, dtype=np.int32)) * seg
    return dict(input_ids=ids, segment_ids=seg, positions=positions.astype(np.int32), gather=gather,
                targets=targets, weights=weights)


class PrefixScorer:
    """Jitted prefix encoding and row scoring for one model (graphdef) on ``mesh``."""

    def __init__(self, graphdef: nnx.GraphDef, mesh: Mesh, batch_size: int, pad_id: int):
        self.mesh, self.batch_size, self.pad_id = mesh, batch_size, pad_id
        self._prefill = jax.jit(partial(_prefill, graphdef))
        self._score = jax.jit(partial(_row_scores, graphdef))

    def encode(self, params: Any, rest: Any, context: np.ndarray, slots: int) -> Context:
        """Cache ``context[:-1]`` in ``slots`` (>= its length) slots; keep its last token."""
        n = len(context) - 1
        if n < 0 or slots < n:
            raise ValueError(f"a context of {len(context)} tokens does not fit a prefix of {slots} slots")
        ids = np.full((1, slots), self.pad_id, np.int32)
        segments = np.zeros((1, slots), np.int32)
        ids[0, :n], segments[0, :n] = context[:-1], 1
        return Context(self._prefill(params, rest, ids, segments), int(context[-1]), n)

    def scores(self, params: Any, rest: Any, context: Context, prompts: Sequence[np.ndarray],
               options: Sequence[Sequence[int]], on_batch: Callable[[int], None] | None = None
               ) -> np.ndarray:
        """``[N, C]`` summed log-likelihood of every option after ``context`` + each prompt;
        ``on_batch(n)`` hears after each batch how many prompts are done."""
        order = np.argsort([len(p) for p in prompts], kind="stable")
        out = np.zeros((len(prompts), len(options)), np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch = suffix_arrays(context, [prompts[i] for i in rows], options, self.batch_size,
                                  self.pad_id)
            ll = self._score(params, rest, context.prefix, sharding.shard_batch(batch, self.mesh))
            out[rows] = np.asarray(jax.device_get(ll))[:len(rows)]
            if on_batch is not None:
                on_batch(start + len(rows))
        return out
