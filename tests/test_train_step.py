"""The train step's dropout: fresh masks per step from the state's RNG, none at eval."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ftjax import sharding
from ftjax.models import registry
from ftjax.train.step import TrainState, make_train_step


def _setup(dropout: float):
    family, cfg = registry.get_preset("tiny-bert")
    cfg = dataclasses.replace(cfg, dropout=dropout)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = registry.init_sharded(lambda r: family.build(cfg, "sequence_classification", 2, r), mesh)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    # learning rate 0: parameters never move, only the masks can change
    tx = optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.0))
    step = jax.jit(make_train_step(graphdef, tx, kind="classification"))
    ids = jax.random.randint(jax.random.key(0), (4, 12), 3, cfg.vocab_size)
    batch = dict(input_ids=ids, segment_ids=jnp.ones_like(ids),
                 positions=jnp.broadcast_to(jnp.arange(12), (4, 12)),
                 labels=jnp.array([0, 1, 1, 0]), example_mask=jnp.ones(4))

    def loss(rng_seed: int) -> float:
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           rng=jax.random.key(rng_seed))
        return float(step(state, frozen, batch)[1]["loss"])

    def eval_loss() -> float:
        logits = nnx.merge(graphdef, params, frozen)(ids, jnp.ones_like(ids))
        return float(optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean())

    return loss, eval_loss


def test_dropout_masks_follow_the_state_rng():
    loss, eval_loss = _setup(dropout=0.3)
    assert loss(0) == loss(0)  # reproducible from the state's key (exact resume)
    assert loss(0) != loss(1)  # a new key, new masks
    assert not np.isclose(loss(0), eval_loss(), rtol=1e-6)  # dropout is on in training ...
    no_dropout, no_dropout_eval = _setup(dropout=0.0)
    assert no_dropout(0) == no_dropout(1)  # ... and nothing is random without it
    np.testing.assert_allclose(no_dropout(0), no_dropout_eval(), rtol=1e-5)
