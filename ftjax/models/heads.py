"""Task heads over a decoder backbone (HF names: ``lm_head``, ``score``), and :func:`build`,
which every decoder family uses to put one on its backbone.

A backbone maps ``(input_ids, attention_mask, positions, segment_ids)`` to hidden states
``[B, T, D]`` and owns ``embed_tokens`` (used by a tied LM head). Every headed model class (here
and in bert.py) names its head in the class attribute ``head``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.models import layers

HEADS = ("causal_lm", "sequence_classification", "token_classification")


def last_token_index(attention_mask: jax.Array | None, input_ids: jax.Array,
                     pad_token_id: int | None) -> jax.Array:
    """Index of the last non-pad token per row (transformers' *ForSequenceClassification rule)."""
    t = input_ids.shape[1]
    if attention_mask is not None:
        keep = attention_mask.astype(bool)
    elif pad_token_id is not None:
        keep = input_ids != pad_token_id
    else:
        return jnp.full((input_ids.shape[0],), t - 1, jnp.int32)
    return jnp.argmax(jnp.arange(t) * keep, axis=-1).astype(jnp.int32)


class CausalLM(nnx.Module):
    """Backbone + LM head (tied to the input embedding when ``tie``)."""

    head = "causal_lm"

    def __init__(self, backbone: nnx.Module, hidden: int, vocab: int, *, tie: bool,
                 init_std: float = 0.02, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, final_softcap: float | None = None):
        self.model = backbone
        self.final_softcap = final_softcap
        self.lm_head = None if tie else layers.Linear(
            hidden, vocab, axes=("embed", "vocab"), init_std=init_std, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                 inputs_embeds=None) -> jax.Array:
        return self.logits(self.model(input_ids, attention_mask, positions, segment_ids,
                                      inputs_embeds))

    @property
    def ties_input_embedding(self) -> bool:
        """Whether the output projection is the token embedding table (a matmul, for FLOPs)."""
        return self.lm_head is None

    def logits(self, h: jax.Array) -> jax.Array:
        """Vocabulary logits for final hidden states ``[..., D]`` (decoding projects one position)."""
        logits = self.model.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        if self.final_softcap is not None:
            logits = self.final_softcap * jnp.tanh(logits / self.final_softcap)
        return logits


class SequenceClassifier(nnx.Module):
    """Backbone + ``score`` projection pooled at the last non-pad token."""

    head = "sequence_classification"

    def __init__(self, backbone: nnx.Module, hidden: int, num_labels: int, *,
                 pad_token_id: int | None, init_std: float = 0.02, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.model = backbone
        self.pad_token_id = pad_token_id
        self.score = layers.Linear(hidden, num_labels, axes=("embed", "labels"), init_std=init_std,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                 inputs_embeds=None) -> jax.Array:
        h = self.model(input_ids, attention_mask, positions, segment_ids, inputs_embeds)
        idx = last_token_index(attention_mask, input_ids, self.pad_token_id)
        pooled = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]
        return self.score(pooled)


class TokenClassifier(nnx.Module):
    """Backbone + per-token ``score`` projection (with bias, as transformers)."""

    head = "token_classification"

    def __init__(self, backbone: nnx.Module, hidden: int, num_labels: int, *,
                 init_std: float = 0.02, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.model = backbone
        self.score = layers.Linear(hidden, num_labels, axes=("embed", "labels"), use_bias=True,
                                   init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                 inputs_embeds=None) -> jax.Array:
        return self.score(self.model(input_ids, attention_mask, positions, segment_ids, inputs_embeds))


def build(backbone: nnx.Module, cfg: Any, head: str, num_labels: int, rngs: nnx.Rngs, *,
          tie: bool, final_softcap: float | None = None) -> nnx.Module:
    """``backbone`` (built from ``cfg``) with the ``head`` of this module on top."""
    common = dict(init_std=cfg.initializer_range, rngs=rngs, dtype=jnp.dtype(cfg.dtype),
                  param_dtype=jnp.dtype(cfg.param_dtype))
    if head == "causal_lm":
        return CausalLM(backbone, cfg.hidden_size, cfg.vocab_size, tie=tie,
                        final_softcap=final_softcap, **common)
    if head == "sequence_classification":
        return SequenceClassifier(backbone, cfg.hidden_size, num_labels,
                                  pad_token_id=cfg.pad_token_id, **common)
    if head == "token_classification":
        return TokenClassifier(backbone, cfg.hidden_size, num_labels, **common)
    raise ValueError(f"unknown head {head!r} for {cfg.model_type}; choose from {HEADS}")
