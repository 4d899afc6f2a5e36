"""scan vs unrolled layers and remat policies: one parameter layout, same loss and gradients."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax import sharding
from ftjax.models import registry
from ftjax.train.step import cross_entropy


@functools.lru_cache(maxsize=None)
def _loss_and_grads(scan: bool, remat: str):
    family, cfg = registry.get_preset("tiny-llama")
    cfg = dataclasses.replace(cfg, num_layers=3, scan_layers=scan, remat=remat)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = registry.init_sharded(lambda r: family.build(cfg, "causal_lm", 0, r), mesh, seed=3)
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)
    mask = jnp.ones((2, 16), jnp.int32).at[1, 12:].set(0)

    def loss(p):
        logits = nnx.merge(graphdef, p)(ids, attention_mask=mask)
        nll = cross_entropy(logits[:, :-1], ids[:, 1:])
        w = mask[:, 1:]
        return jnp.sum(nll * w) / jnp.sum(w)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), {jax.tree_util.keystr(k): np.asarray(v)
                          for k, v in jax.tree_util.tree_leaves_with_path(grads)}


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "full"), (False, "full"),
                                        (True, "dots"), (True, "dots_no_batch")])
def test_same_loss_and_grads(scan, remat):
    ref_loss, ref_grads = _loss_and_grads(True, "none")
    loss, grads = _loss_and_grads(scan, remat)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_unknown_remat_policy_is_named():
    with pytest.raises(ValueError, match="unknown remat policy 'everything'"):
        _loss_and_grads(True, "everything")
