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


def test_optimizer_moments_are_sharded_like_their_parameters():
    """On the 8-device fsdp mesh every Adam moment is laid out as its parameter (an unconstrained
    ``tx.init`` left them replicated: 8x the optimizer memory an FSDP run plans for), and the bytes
    device 0 holds equal the memory estimate's optimizer figure."""
    from ftjax.configs import tiny
    from ftjax.train import memory, optim
    from ftjax.train.experiment import build
    from ftjax.train.loop import init_state

    config = tiny.get_config()
    config.data.cache_dir = "none"
    exp = build(config)
    tx = optim.make_optimizer(config.train, **exp.plan.optimizer_kwargs())
    state = init_state(exp, tx)
    params = dict(nnx.to_flat_state(state.params))
    moments = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
        if "mu" in keys or "nu" in keys:
            param_path = keys[keys.index("mu" if "mu" in keys else "nu") + 1:-1]
            assert leaf.sharding.is_equivalent_to(params[param_path].get_value().sharding, leaf.ndim), keys
            moments += 1
    assert moments == 2 * len(params)
    on_device0 = sum(s.data.nbytes for x in jax.tree.leaves(state.opt_state)
                     for s in x.addressable_shards if s.device == jax.devices()[0])
    assert on_device0 == memory.optimizer_bytes(tx, exp.params, exp.mesh)
