"""Sampling parameters and the jitted next-token rule (greedy, temperature, top-k, top-p).

Every parameter is a per-row array, so requests with different settings share one batch and one
compile. Each row draws from its own key (its seed folded with the step), so a seeded request
gives the same tokens whatever else is in its batch.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one prompt is continued. ``temperature=0`` is greedy; ``top_k=0``/``top_p=1`` are off."""
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings (not part of the returned text)
    stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's / model's EOS ids

    def __post_init__(self):
        checks = [(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
                  (self.temperature >= 0 and np.isfinite(self.temperature), "temperature",
                   "must be a finite number >= 0"),
                  (self.top_k >= 0, "top_k", "must be >= 0 (0 disables it)"),
                  (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
                  (all(isinstance(s, str) and s for s in self.stop), "stop",
                   "must be non-empty strings")]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {why}")


class SamplingArrays(NamedTuple):
    """``SamplingParams`` of a batch as ``[B]`` device arrays."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array

    @classmethod
    def stack(cls, params: Sequence[SamplingParams]) -> "SamplingArrays":
        return cls(np.array([p.temperature for p in params], np.float32),
                   np.array([p.top_k for p in params], np.int32),
                   np.array([p.top_p for p in params], np.float32),
                   np.array([p.seed for p in params], np.uint32))


def sample(logits: jax.Array, step: jax.Array, params: SamplingArrays) -> jax.Array:
    """Next token ``[B]`` from ``logits [B, V]``; rows with temperature 0 take the argmax.

    ``step`` (a scalar, or ``[B]`` when rows are at different steps) is each row's count of
    tokens drawn so far: it is folded into the row's seed.

    Temperature, then top-k, then top-p on the renormalised top-k distribution (transformers'
    order). The vocabulary sort only runs when some row samples.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = params.temperature > 0

    def draw(_):
        vocab = logits.shape[-1]
        scaled = logits.astype(jnp.float32) / jnp.where(sampling, params.temperature, 1.0)[:, None]
        order = jnp.argsort(scaled, axis=-1, descending=True)
        ranked = jnp.take_along_axis(scaled, order, axis=-1)
        rank = jnp.arange(vocab)[None]
        in_k = rank < jnp.where(params.top_k > 0, params.top_k, vocab)[:, None]
        probs = jax.nn.softmax(jnp.where(in_k, ranked, -jnp.inf), axis=-1)
        keep = in_k & ((jnp.cumsum(probs, axis=-1) - probs) < params.top_p[:, None])
        keep = keep.at[:, 0].set(True)
        steps = jnp.broadcast_to(step, params.seed.shape)
        keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(params.seed, steps)
        choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, ranked, -jnp.inf))
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(sampling), draw, lambda _: greedy, None)
    return jnp.where(sampling, drawn, greedy)
