"""The unfreezing mask lives in the optimizer (``optim.make_optimizer(mask_fn=...)``): it masks the
gradient before clipping and the moments, and the update after weight decay. Checked against
hand-computed SGD and AdamW steps (float64, atol 1e-6) on a two-row parameter whose first row
is frozen for two steps."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ftjax.config import base_config
from ftjax.train import optim

P0 = np.array([[1.0, -2.0], [0.5, 0.25]], np.float32)
G = np.array([[100.0, 100.0], [0.3, 0.4]], np.float32)  # row 0: large, frozen; row 1 norm 0.5


def frozen_row0_until_step2(tree, step):
    keep = (jnp.arange(2) > 0) | (step >= 2)
    return {k: jnp.where(keep[:, None], v, 0.0) for k, v in tree.items()}


def _tx(optimizer: str, **train):
    t = base_config().train
    t.update(dict(optimizer=optimizer, schedule="constant", warmup_steps=0, grad_clip=1.0, **train))
    return optim.make_optimizer(t, mask_fn=frozen_row0_until_step2)


def _step(tx, params, state):
    updates, state = tx.update({"w": jnp.asarray(G)}, state, params)
    return {"w": params["w"] + updates["w"]}, state


def test_clipping_and_the_logged_norm_see_the_masked_gradient():
    tx = _tx("sgd", learning_rate=1.0)
    params = {"w": jnp.asarray(P0)}
    params, state = _step(tx, params, tx.init(params))
    # Masked gradient [[0, 0], [0.3, 0.4]]: norm 0.5 < clip 1, so SGD(lr 1) moves row 1 by it exactly
    # (clipping on the unmasked norm, 141.4, would have shrunk it 283-fold).
    np.testing.assert_array_equal(np.asarray(params["w"]), P0 - np.array([[0, 0], [0.3, 0.4]], np.float32))
    np.testing.assert_allclose(float(optim.grad_norm(state, {"w": G})), 0.5, rtol=1e-6)


def test_frozen_rows_stay_bitwise_and_unfreeze_with_empty_moments():
    lr, wd, b1, b2, eps = 0.1, 0.1, 0.9, 0.999, 1e-8
    tx = _tx("adamw", learning_rate=lr, weight_decay=wd, b1=b1, b2=b2, eps=eps)
    params = {"w": jnp.asarray(P0)}
    state = tx.init(params)
    # Reference AdamW (optax's form: bias-corrected moments over the global count, decoupled
    # decay), each row's moments fed only while the row trains.
    p, m, v = P0.astype(np.float64), np.zeros_like(P0, np.float64), np.zeros_like(P0, np.float64)
    norm = np.sqrt((G[1] ** 2).sum())
    for count in range(1, 5):
        params, state = _step(tx, params, state)
        live = np.array([count > 2, True])[:, None]
        g = np.where(live, G, 0.0)
        g = g * min(1.0, 1.0 / (norm if count <= 2 else np.sqrt((G ** 2).sum())))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1 ** count)) / (np.sqrt(v / (1 - b2 ** count)) + eps) + wd * p
        p = np.where(live, p - lr * u, p)
        got = np.asarray(params["w"])
        if count <= 2:
            np.testing.assert_array_equal(got[0], P0[0])  # weight decay included
        np.testing.assert_allclose(got, p, rtol=0, atol=1e-6)  # float32 vs a float64 reference
