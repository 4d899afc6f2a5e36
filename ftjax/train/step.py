"""The pure train step: one ``jax.jit`` with explicit shardings and a donated state.

The model is split once into ``graphdef`` + trainable params + frozen rest; the step merges
them inside, computes a masked loss, accumulates gradients over micro-batches with ``lax.scan``,
clips and applies the optimizer. What trains is decided by the method's filter, never here.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ftjax.models import layers
from ftjax.train import lm_loss, optim
from ftjax.train.lm_loss import cross_entropy, is_argmax  # noqa: F401 (re-exported)

LOSS_KINDS = {"causal_lm": "lm", "sequence_classification": "classification",
              "token_classification": "token"}
IGNORE = -100


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the trainable parameters
    opt_state: Any
    rng: jax.Array
    method_state: Any = None  # a method's own state beyond the params (peft.plan.StepHook)


def model_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Keyword arguments of a model call from a pipeline batch."""
    seg = batch["segment_ids"]
    return dict(input_ids=batch["input_ids"], attention_mask=(seg > 0).astype(jnp.int32),
                positions=batch["positions"], segment_ids=seg)


def restrict_to_task(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """Multi-task classification: only the row's own task's labels (``label_mask``) can win."""
    if "label_mask" not in batch:
        return logits
    return jnp.where(batch["label_mask"], logits, jnp.finfo(logits.dtype).min)


def loss_terms(logits: jax.Array, batch: dict[str, jax.Array], kind: str, num_tasks: int = 0
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of losses, sum of weights, number of correct predictions) for one batch.

    With ``num_tasks`` > 1 each is a ``[num_tasks]`` vector of sums over the rows of each
    ``task_id``.
    """
    logits = restrict_to_task(logits, batch)
    if kind == "lm":
        labels, weights = batch["targets"], batch["loss_mask"].astype(jnp.float32)
    elif kind == "classification":
        labels, weights = batch["labels"], batch["example_mask"].astype(jnp.float32)
    elif kind == "token":
        labels = batch["labels"]
        weights = ((labels != IGNORE) & (batch["segment_ids"] > 0)).astype(jnp.float32)
        weights = weights * batch["example_mask"][:, None]
    else:
        raise ValueError(f"unknown loss kind {kind!r}")
    nll = cross_entropy(logits, labels)
    correct = is_argmax(logits, labels).astype(jnp.float32)
    return _sum_terms((nll * weights, weights, correct * weights), batch, num_tasks)


def lm_loss_terms(model: nnx.Module, batch: dict[str, jax.Array], chunk: int, num_tasks: int = 0
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`loss_terms` of kind "lm" from the model, its head and loss over ``chunk``
    positions at a time (``lm_loss.row_sums``) so the ``[B, T, V]`` logits never exist."""
    if chunk <= 0 or not lm_loss.chunkable(model):
        return loss_terms(model(**model_inputs(batch)), batch, "lm", num_tasks)
    weights = batch["loss_mask"].astype(jnp.float32)
    nll, correct = lm_loss.model_row_sums(model, model_inputs(batch), batch["targets"], weights,
                                          chunk)
    return _sum_terms((nll, weights, correct), batch, num_tasks)


def _sum_terms(terms: tuple[jax.Array, ...], batch: dict[str, jax.Array], num_tasks: int
               ) -> tuple[jax.Array, ...]:
    if num_tasks <= 1:
        return tuple(jnp.sum(x) for x in terms)
    return tuple(jax.ops.segment_sum(x.reshape(x.shape[0], -1).sum(1), batch["task_id"],
                                     num_segments=num_tasks) for x in terms)


def training_model(graphdef: nnx.GraphDef, params: Any, frozen: Any, rng: jax.Array) -> nnx.Module:
    """The model in training mode: every dropout gets a key from the step's RNG.

    The key comes from the train state (folded with the step), so every step draws fresh masks
    and a resumed run draws the same ones.
    """
    model = nnx.merge(graphdef, params, frozen)
    layers.set_dropout_key(model, rng)
    return model


def make_loss_sum(graphdef: nnx.GraphDef, kind: str, *, num_tasks: int = 0, loss_chunk: int = 0
                  ) -> Callable[..., tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]]:
    """``loss_sum(params, frozen, batch, rng) -> (summed loss, (total, weight, correct))``: the
    training-mode loss the train step differentiates (divide by ``weight`` for the mean)."""
    def loss_sum(params, frozen, batch, rng):
        model = training_model(graphdef, params, frozen, rng)
        if kind == "lm":
            total, weight, correct = lm_loss_terms(model, batch, loss_chunk, num_tasks)
        else:
            total, weight, correct = loss_terms(model(**model_inputs(batch)), batch, kind, num_tasks)
        return jnp.sum(total), (total, weight, correct)

    return loss_sum


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, kind: str,
                    grad_accum: int = 1,
                    schedule: Callable[[Any], Any] | None = None,
                    grad_mask_fn: Callable[[Any, jax.Array], Any] | None = None,
                    extra_loss_fn: Callable[[Any], jax.Array] | None = None,
                    num_tasks: int = 0, step_hook: Any = None, loss_chunk: int = 0):
    """Build ``step(state, frozen, batch) -> (state, metrics)`` (not yet jitted).

    ``grad_mask_fn(grads, step)`` may zero gradients (the fused arms' padding; a method's
    unfreezing mask is the optimizer's, see ``optim.make_optimizer``); ``extra_loss_fn(params)``
    adds a regulariser (e.g. L2-SP, EWC) to the mean loss. With ``num_tasks`` > 1 (a mixture) the
    metrics add ``task_loss``, ``task_accuracy`` and ``task_weight``, each ``[num_tasks]``.
    A method's ``step_hook`` (``peft.plan.StepHook``) adds its ``loss`` and, after the optimizer,
    updates ``state.method_state`` (and may change the new params) from the gradients.
    ``loss_chunk`` > 0 (kind "lm"): the LM head and loss run over that many positions at a time
    (see ``lm_loss``).
    """
    if step_hook is not None and step_hook.loss is not None:
        extra_loss_fn = step_hook.loss if extra_loss_fn is None else (
            lambda p, f=extra_loss_fn, g=step_hook.loss: f(p) + g(p))

    grad_fn = jax.value_and_grad(make_loss_sum(graphdef, kind, num_tasks=num_tasks, loss_chunk=loss_chunk),
                                 has_aux=True)

    def step(state: TrainState, frozen: Any, batch: dict[str, jax.Array]):
        if grad_accum == 1:
            (_, (total, weight, correct)), grads = grad_fn(state.params, frozen, batch, state.rng)
        else:
            # Micro-batch i takes rows i, i+A, i+2A, ... so every micro-batch stays evenly sharded.
            micro = jax.tree.map(
                lambda x: jnp.moveaxis(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 1, 0),
                batch)

            def body(carry, mb):
                mb, rng = mb
                (_, (t, w, c)), g = grad_fn(state.params, frozen, mb, rng)
                acc_t, acc_w, acc_c, acc_g = carry
                return (acc_t + t, acc_w + w, acc_c + c, jax.tree.map(jnp.add, acc_g, g)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            sums = jnp.zeros((num_tasks,) if num_tasks > 1 else ())
            keys = jax.random.split(state.rng, grad_accum)
            (total, weight, correct, grads), _ = jax.lax.scan(body, (sums, sums, sums, zeros),
                                                              (micro, keys))
        per_task = dict(task_loss=total / jnp.maximum(weight, 1.0), task_weight=weight,
                        task_accuracy=correct / jnp.maximum(weight, 1.0)) if num_tasks > 1 else {}
        total, weight, correct = jnp.sum(total), jnp.sum(weight), jnp.sum(correct)
        denom = jnp.maximum(weight, 1.0)
        loss = total / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
        if extra_loss_fn is not None:
            reg, reg_grads = jax.value_and_grad(extra_loss_fn)(state.params)
            loss = loss + reg
            grads = jax.tree.map(jnp.add, grads, reg_grads)
        if grad_mask_fn is not None:
            grads = grad_mask_fn(grads, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        grad_norm = optim.grad_norm(opt_state, grads)
        params = optax.apply_updates(state.params, updates)
        method_state = state.method_state
        if step_hook is not None:
            params, method_state = step_hook.update(params, grads, method_state, state.step)
        lr = optim.peak_learning_rate(opt_state)
        if schedule is not None:
            lr = lr * schedule(state.step)
        metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=lr, weight=weight,
                       accuracy=correct / denom, **per_task)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  rng=jax.random.fold_in(state.rng, state.step),
                                  method_state=method_state)
        return new_state, metrics

    return step
