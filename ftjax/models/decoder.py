"""The decoder skeleton GPT-2, Llama and Gemma share: attention, pre-norm block, backbone forward.

A family keeps only what differs: its projections (``Attention`` subclasses project q/k/v and the
output around :meth:`Attention.attend`), its block wiring and, in a :class:`Decoder` subclass, its
HF-named modules, its embedding (``embed``) and what each layer's attention sees
(``layer_context``). The forward here fills in positions and segments, builds the causal masks
(from the KV cache when decoding), runs the stacked blocks and applies the final norm. Every
attention and block returns ``(out, cache)``; the cache is None outside incremental decoding.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
from flax import nnx

from ftjax import sharding
from ftjax.models import layers
from ftjax.models.kv_cache import KVCache, LayerKV
from ftjax.models.stack import run_layers

MaskFn = Callable[[int | None], jax.Array]  # sliding window (None: global) -> [B, 1, T, S] mask


class Context(NamedTuple):
    """What one layer's attention sees besides its input."""
    positions: jax.Array  # [B, T]
    mask: jax.Array  # [B, 1, T, S]
    inv_freq: jax.Array | None  # rotary inverse frequencies; None without rotary embeddings


class Attention(layers.PrefixHook, nnx.Module):
    """Base of the decoder attentions; a subclass sets ``scale`` (and ``softcap``) in ``__init__``."""

    softcap = None

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
               cache: LayerKV | None) -> tuple[jax.Array, LayerKV | None]:
        """``[B, T, N * H]`` attention output over the cache (after writing k, v; a shared prefix
        first) or over k, v, and the prefix-tuning keys/values when set; returns the written cache."""
        if cache is not None:
            cache = cache.write(k, v)
            k, v = cache.keys_values()
        out = layers.dot_product_attention(q, k, v, mask, scale=self.scale, softcap=self.softcap,
                                           prefix=self.prefix_kv())
        return out.reshape(*out.shape[:2], -1), cache


def pre_norm_block(x: jax.Array, ctx: Context, cache: LayerKV | None, attn_norm: nnx.Module,
                   attn: Attention, mlp_norm: nnx.Module, mlp: nnx.Module
                   ) -> tuple[jax.Array, LayerKV | None]:
    """``x + attn(attn_norm(x))``, then ``x + mlp(mlp_norm(x))`` (GPT-2, Llama, Gemma 1)."""
    out, cache = attn(attn_norm(x), ctx, cache)
    x = x + out
    x = x + mlp(mlp_norm(x))
    return sharding.constrain(x, "batch", "act_seq", "act_embed"), cache


class Decoder(nnx.Module):
    """A decoder backbone: token ids -> final normalised hidden states ``[B, T, D]``.

    A subclass sets ``cfg`` (with ``scan_layers`` and ``remat``) and its modules under their HF
    names, and defines ``layer_context``. ``blocks`` and ``final_norm`` name the stacked blocks
    (each called ``block(x, ctx, cache) -> (x, cache)``) and the final norm; ``embed`` looks up
    ``embed_tokens`` (a family with other embeddings overrides it).
    """

    blocks, final_norm = "layers", "norm"  # attribute names (Llama's)

    def embed(self, input_ids: jax.Array, positions: jax.Array,
              inputs_embeds: jax.Array | None) -> jax.Array:
        """The first hidden states: the token embeddings unless ``inputs_embeds`` are given."""
        return self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    def layer_context(self, positions: jax.Array, mask: MaskFn
                      ) -> tuple[Callable[[Any], Context], Any]:
        """``(context, per_layer)``: ``context(layer_input)`` is one layer's :class:`Context`,
        ``per_layer`` a pytree with a leading layer axis (e.g. which layers are local) or None."""
        raise NotImplementedError

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 inputs_embeds: jax.Array | None = None, cache: KVCache | None = None
                 ) -> jax.Array | tuple[jax.Array, KVCache]:
        """With ``cache`` (incremental decoding) also returns the cache holding the new tokens."""
        positions, segment_ids = layers.default_positions_and_segments(
            input_ids, attention_mask, positions, segment_ids)
        if cache is not None:
            cache = cache.append(positions, segment_ids)

        def mask(window: int | None) -> jax.Array:
            if cache is not None:
                return cache.mask(positions, segment_ids, window)
            return layers.attention_mask(segment_ids, segment_ids, positions, positions,
                                         causal=True, sliding_window=window)

        context, per_layer = self.layer_context(positions, mask)
        h = sharding.constrain(self.embed(input_ids, positions, inputs_embeds),
                               "batch", "act_seq", "act_embed")
        layer_kv = None if cache is None else cache.per_layer()
        h, kv = run_layers(getattr(self, self.blocks), h,
                           lambda blk, x, xs: blk(x, context(xs[0]), xs[1]),
                           scan=self.cfg.scan_layers, remat=self.cfg.remat,
                           per_layer=(per_layer, layer_kv), collect=True)
        h = getattr(self, self.final_norm)(h)
        return h if cache is None else (h, cache.advance(kv, positions.shape[1]))
