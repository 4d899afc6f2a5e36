"""Reward models: a scalar head trained with the Bradley-Terry loss on preference pairs.

``model.head = "reward"`` is a sequence classifier with one output (Hugging Face's and TRL's
reward model: ``*ForSequenceClassification`` with ``num_labels=1``), so it builds, loads and
exports through the existing heads and works on any decoder (last real token) or encoder (its
pooled ``[CLS]``). Loss as TRL's ``RewardTrainer``: ``-log sigmoid(r_c - r_r - margin)`` plus
``center * mean((r_c + r_r) ** 2)`` (Eisenstein et al. 2023's reward centring).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ftjax.models import layers
from ftjax.preference.step import flat_inputs
from ftjax.train import optim
from ftjax.train.step import TrainState, model_inputs

HEAD = "reward"


def model_head(head: str, num_labels: int) -> tuple[str, int]:
    """The (head, num_labels) to build for ``config.model.head``: ``reward`` is a 1-output classifier."""
    return ("sequence_classification", 1) if head == HEAD else (head, num_labels)


def pair_rewards(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
    """Scalar rewards ``[B, 2]`` of the chosen and rejected sequences of each pair."""
    return model(**model_inputs(flat_inputs(batch)))[:, 0].astype(jnp.float32).reshape(-1, 2)


def bradley_terry(rewards: jax.Array, margin: jax.Array | float = 0.0, center: float = 0.0
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Bradley-Terry loss over ``[B, 2]`` rewards and TRL's reward metrics."""
    diff = rewards[:, 0] - rewards[:, 1]
    loss = -jnp.mean(jax.nn.log_sigmoid(diff - margin))
    if center:
        loss = loss + center * jnp.mean(jnp.sum(rewards, axis=1) ** 2)
    return loss, dict(loss=loss, accuracy=jnp.mean((diff > 0).astype(jnp.float32)), margin=jnp.mean(diff),
                      mean_reward=jnp.mean(rewards), min_reward=jnp.min(rewards), max_reward=jnp.max(rewards))


def make_reward_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, center: float = 0.0,
                     schedule: Callable[[Any], Any] | None = None):
    """Build ``step(state, frozen, batch) -> (state, metrics)`` for a reward model (not yet jitted);
    a batch may carry ``margin [B]``."""

    def loss_fn(params, frozen, batch, rng):
        model = nnx.merge(graphdef, params, frozen)
        layers.set_dropout_key(model, rng)
        return bradley_terry(pair_rewards(model, batch), batch.get("margin", 0.0), center)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, frozen: Any, batch: dict[str, jax.Array]):
        (_, metrics), grads = grad_fn(state.params, frozen, batch, state.rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = optim.peak_learning_rate(opt_state)
        if schedule is not None:
            lr = lr * schedule(state.step)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), learning_rate=lr)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state, rng=jax.random.fold_in(state.rng, state.step)), metrics

    return step


def score_texts(model: nnx.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16,
                max_len: int = 128) -> np.ndarray:
    """Rewards of whole texts (e.g. prompt + an ``ftjax.generate`` completion), ``[len(texts)]``."""
    return text_logits(model, tokenizer, texts, batch_size=batch_size, max_len=max_len)[:, 0]


@functools.partial(jax.jit, static_argnums=0)  # one compile per architecture and shape, not per call
def _outputs(graphdef: nnx.GraphDef, state: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(input_ids=ids, attention_mask=mask, segment_ids=mask,
                                      positions=jnp.maximum(jnp.cumsum(mask, 1) - 1, 0))


def text_logits(model: nnx.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16,
                max_len: int = 128) -> np.ndarray:
    """A sequence classifier's (or reward model's) outputs for whole texts, ``[len(texts), labels]``."""
    graphdef, state = nnx.split(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = [tokenizer(t, truncation=True, max_length=max_len)["input_ids"] for t in texts[i:i + batch_size]]
        width = min(-(-max(len(e) for e in enc) // 16) * 16, max_len)  # few widths, few compiles
        ids = np.full((len(enc), width), pad, np.int32)
        mask = np.zeros((len(enc), width), np.int32)
        for j, e in enumerate(enc):
            ids[j, :len(e)], mask[j, :len(e)] = e, 1
        out.append(np.asarray(_outputs(graphdef, state, ids, mask), np.float32))
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)
