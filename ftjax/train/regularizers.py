"""Regularisers against forgetting, from ``config.regularizer``: L2-SP and EWC.

Both are ``strength / 2 * sum(F * (theta - theta_start) ** 2)`` over the trainable parameters,
where ``theta_start`` is the run's starting point (the pretrained weights, or the previous stage's
weights via ``model.init_from``). L2-SP (Li et al. 2018) takes F = 1; EWC (Kirkpatrick et al. 2017)
takes the diagonal empirical Fisher ``F = mean over examples of (d log p(y|x) / d theta) ** 2``,
estimated at ``theta_start`` on the train rows of ``fisher_tasks``, one example at a time.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ftjax.train.step import loss_terms, model_inputs

KINDS = ("none", "l2sp", "ewc")


def penalty(params: Any, anchor: Any, weights: Any | None, strength: float) -> jax.Array:
    """``strength / 2 * sum(w * (params - anchor) ** 2)``; ``weights=None`` means w = 1 (L2-SP)."""
    if weights is None:
        weights = jax.tree.map(lambda _: 1.0, anchor)
    terms = jax.tree.map(lambda p, a, w: jnp.sum(w * (p.astype(jnp.float32) - a) ** 2),
                         params, anchor, weights)
    return 0.5 * strength * sum(jax.tree.leaves(terms))


def fisher_rows(pipe: Any, tasks: list[str], per_task: int, batch_size: int
                ) -> Iterator[dict[str, np.ndarray]]:
    """Train rows (file order) of ``tasks`` (all tasks if empty), at most ``per_task`` per task;
    rows not taken have ``example_mask`` 0, batches with none taken are skipped."""
    names = pipe.info.task_names
    unknown = sorted(set(tasks) - set(names))
    if unknown:
        raise ValueError(f"config.regularizer.fisher_tasks has {unknown}; the mixture has {names}")
    wanted = [names.index(t) for t in tasks] if tasks else list(range(len(names)))
    taken = dict.fromkeys(wanted, 0)
    for batch in pipe.eval_batches(batch_size, split="train"):
        task_ids = batch.get("task_id", np.zeros(len(batch["example_mask"]), np.int64))
        keep = np.zeros(len(task_ids), bool)
        for i, (t, m) in enumerate(zip(task_ids, batch["example_mask"])):
            if m and int(t) in taken and taken[int(t)] < per_task:
                keep[i], taken[int(t)] = True, taken[int(t)] + 1
        if keep.any():
            yield dict(batch, example_mask=keep.astype(batch["example_mask"].dtype))
        if all(n >= per_task for n in taken.values()):
            return


def fisher_diagonal(graphdef: nnx.GraphDef, params: Any, frozen: Any, kind: str,
                    batches: Iterable[dict[str, np.ndarray]]) -> Any:
    """Diagonal empirical Fisher: mean over the unmasked rows of the squared per-example gradient
    of the example's summed negative log-likelihood."""

    def nll(p, example):
        model = nnx.merge(graphdef, p, frozen)
        return loss_terms(model(**model_inputs(example)), example, kind)[0]

    grad = jax.grad(nll)

    @jax.jit
    def add_batch(p, batch, acc):
        def body(acc, row):
            example = jax.tree.map(lambda x: x[None], row)
            g = grad(p, example)
            w = example["example_mask"][0].astype(jnp.float32)
            return jax.tree.map(lambda a, gi: a + w * gi.astype(jnp.float32) ** 2, acc, g), None

        return jax.lax.scan(body, acc, batch)[0]

    acc = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    count = 0
    for batch in batches:
        acc = add_batch(params, batch, acc)
        count += int(np.sum(batch["example_mask"]))
    if not count:
        raise ValueError("the Fisher estimate saw no examples (config.regularizer.fisher_tasks)")
    return jax.tree.map(lambda a: a / count, acc)


def from_config(config: ml_collections.ConfigDict, exp: Any) -> Callable[[Any], jax.Array] | None:
    """``extra_loss_fn(params)`` for ``config.regularizer`` anchored at ``exp.params``, or None."""
    r = config.regularizer
    if r.kind not in KINDS:
        raise ValueError(f"config.regularizer.kind={r.kind!r}; choose from {KINDS}")
    if r.kind == "none" or not r.strength:
        return None
    anchor = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), exp.params)
    weights = None
    if r.kind == "ewc":
        rows = fisher_rows(exp.pipe, list(r.fisher_tasks), int(r.fisher_examples), config.eval.batch_size)
        weights = fisher_diagonal(exp.graphdef, exp.params, exp.frozen, exp.kind, rows)
    strength = float(r.strength)
    return lambda params: penalty(params, anchor, weights, strength)
