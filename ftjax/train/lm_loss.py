"""Token-level losses, and a causal LM's head + cross-entropy over sequence chunks.

Materialised at once, a causal LM's logits are ``[B, T, V]`` float32 (4.2 GB per sequence for
Llama-3's 128k vocabulary at T=8192), and the backward pass holds their gradient too.
:func:`row_sums` with ``chunk`` > 0 runs the head (whatever ``CausalLM.logits`` does: the tied
embedding or ``lm_head``, Gemma's final soft-cap, a method's adapter on the head) and the
log-softmax on ``chunk`` positions at a time, in a ``lax.scan`` under ``jax.checkpoint``: the
forward keeps only the hidden states, the backward recomputes one chunk's logits at a time. The
price is the head's forward matmul once more (2·D·V FLOPs per token).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ftjax.models import heads


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-position negative log-likelihood in float32 (labels outside range give garbage: mask them)."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return logz - picked


def is_argmax(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``argmax(logits, -1) == labels`` (ties go to the first index), without an argmax.

    XLA:CPU runs argmax as a slow (value, index) reduction: over a 49k vocabulary it cost more
    than the log-softmax. Here: the label's logit is the maximum and no earlier class reaches it.
    """
    top = jnp.max(logits, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[..., None], axis=-1)
    earlier_tie = jnp.any((logits == top) & (jnp.arange(logits.shape[-1]) < labels[..., None]), -1)
    return (picked[..., 0] >= top[..., 0]) & ~earlier_tie & (labels >= 0)


def chunkable(model: object) -> bool:
    """Whether ``model``'s call is backbone then ``logits`` (a method that changes the call, such
    as prompt tuning's virtual tokens, is scored from its full logits instead)."""
    return isinstance(model, heads.CausalLM) and type(model).__call__ is heads.CausalLM.__call__


def model_row_sums(model: object, inputs: dict[str, jax.Array], labels: jax.Array,
                   weights: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """:func:`row_sums` of a causal LM called on ``inputs``: chunked when ``chunk`` > 0 and the
    model is :func:`chunkable`, else from its full logits."""
    if chunk > 0 and chunkable(model):
        return row_sums(model.logits, model.model(**inputs), labels, weights, chunk)
    return row_sums(lambda logits: logits, model(**inputs), labels, weights)


def _sums(head: Callable[[jax.Array], jax.Array], h: jax.Array, labels: jax.Array,
          weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = head(h)
    nll = cross_entropy(logits, labels) * weights
    correct = is_argmax(logits, labels).astype(jnp.float32) * weights
    return nll.sum(-1), correct.sum(-1)


def row_sums(head: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array,
             weights: jax.Array, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """Per-row ``(sum of weighted NLL, sum of weighted argmax hits)``, each ``[B]``, of the
    logits ``head(hidden)`` (hidden ``[B, T, D]``, labels and weights ``[B, T]``).

    ``chunk`` > 0: ``chunk`` positions at a time, recomputed in the backward pass (a last,
    shorter chunk takes the rest when ``chunk`` does not divide T); 0: all at once.
    """
    t = hidden.shape[1]
    if chunk <= 0:
        return _sums(head, hidden, labels, weights)

    def one(h, y, w, prevent_cse=True):
        return jax.checkpoint(lambda *a: _sums(head, *a), prevent_cse=prevent_cse)(h, y, w)

    if chunk >= t:
        return one(hidden, labels, weights)
    n, full = t // chunk, t // chunk * chunk

    def split(x):  # [B, n * chunk, ...] -> [n, B, chunk, ...]: the batch axis keeps its sharding
        return jnp.moveaxis(x[:, :full].reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)

    # prevent_cse=False inside scan, as jax.checkpoint's docs advise: the loop already keeps XLA
    # from merging the recomputation with the forward pass.
    _, (nll, correct) = jax.lax.scan(lambda _, xs: (None, one(*xs, prevent_cse=False)), None,
                                     (split(hidden), split(labels), split(weights)))
    nll, correct = nll.sum(0), correct.sum(0)
    if full < t:
        tail = one(hidden[:, full:], labels[:, full:], weights[:, full:])
        nll, correct = nll + tail[0], correct + tail[1]
    return nll, correct
