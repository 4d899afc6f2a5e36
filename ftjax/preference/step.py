"""The preference train step: chosen and rejected of each pair in one forward, a reference
policy beside it, and the configured loss (``ftjax.preference.losses``).

A batch holds ``input_ids [B, 2, L]`` (column 0 chosen, 1 rejected), ``prompt_len`` and
``length`` ``[B, 2]`` and, with ``reference=precomputed``, ``ref_logp [B, 2]``. The model sees
the ``2B`` sequences at once; the log-prob of a response is the sum over positions
``prompt_len - 1 <= t < length - 1`` of ``log p(x[t+1] | x[:t+1])``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ftjax.models import layers
from ftjax.preference import losses, reference
from ftjax.train import optim
from ftjax.train.step import TrainState, cross_entropy, model_inputs


def flat_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The ``2B`` sequences as model inputs plus ``targets`` and the masks of predicted tokens:
    ``response`` (the loss) and ``predicted`` (every real next token, ORPO's NLL)."""
    ids = batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1])
    plen, length = batch["prompt_len"].reshape(-1, 1), batch["length"].reshape(-1, 1)
    t = jnp.arange(ids.shape[1])[None, :]
    real = t < length
    targets = jnp.concatenate([ids[:, 1:], ids[:, :1]], axis=1)
    predicted = t < length - 1
    return dict(input_ids=ids, segment_ids=real.astype(jnp.int32), positions=jnp.where(real, t, 0),
                targets=targets, response=((t >= plen - 1) & predicted).astype(jnp.float32),
                predicted=predicted.astype(jnp.float32))


def mismatched(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """KTO's KL batch: the prompt of pair ``i`` with the responses of pair ``i - 1`` (TRL's +1
    rotation of completions, by pairs so no prompt meets its own response)."""
    ids, plen, length = batch["input_ids"], batch["prompt_len"], batch["length"]
    src = lambda x: jnp.roll(x, 1, axis=0)
    s_ids, s_plen, s_len = src(ids), src(plen), src(length)
    L = ids.shape[-1]
    t = jnp.arange(L)
    j = t - plen[..., None] + s_plen[..., None]  # where position t reads the other response
    tail = jnp.take_along_axis(s_ids, jnp.clip(j, 0, L - 1), axis=-1)
    new_len = jnp.minimum(plen + s_len - s_plen, L)
    out = jnp.where(t < plen[..., None], ids, jnp.where(t < new_len[..., None], tail, 0))
    return dict(input_ids=out, prompt_len=plen, length=new_len)


def token_logps(model: nnx.Module, inputs: dict[str, jax.Array]) -> jax.Array:
    """``log p(targets)`` at every position ``[2B, L]`` in float32."""
    logits = model(**model_inputs(inputs))
    return -cross_entropy(logits, inputs["targets"])


def response_logps(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(summed response log-probs ``[B, 2]``, per-token log-probs ``[2B, L]``)."""
    inputs = flat_inputs(batch)
    tok = token_logps(model, inputs)
    return jnp.sum(tok * inputs["response"], axis=1).reshape(-1, 2), tok


def _chosen_nll(tok: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean NLL over the chosen sequences' ``mask``ed positions (rows 0, 2, 4, ... of ``2B``)."""
    tok, mask = tok.reshape(-1, 2, tok.shape[-1])[:, 0], mask.reshape(-1, 2, mask.shape[-1])[:, 0]
    return -jnp.sum(tok * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def reference_logps(graphdef: nnx.GraphDef, state: Any, batches: Iterable[dict[str, np.ndarray]]
                    ) -> np.ndarray:
    """Summed response log-probs ``[N, 2]`` of the model ``(graphdef, state)`` over ``batches``
    (the reference log-probs precomputed once per pair)."""
    fn = jax.jit(lambda st, b: response_logps(nnx.merge(graphdef, st), b)[0])
    return np.concatenate([np.asarray(fn(state, b)) for b in batches], axis=0)


def make_loss_fn(graphdef: nnx.GraphDef, pcfg: Any, reference_mode: str):
    """``loss_fn(params, frozen, batch, ref_params, rng) -> (loss, metrics)``; ``rng=None`` is
    evaluation (no dropout). ``ref_params`` is the frozen copy for ``reference_mode="copy"``."""
    losses.check(pcfg)
    if pcfg.loss == "kto" and reference_mode == "precomputed":
        raise losses.PreferenceConfigError(
            "config.preference.loss=kto estimates its KL term on mismatched pairs of each batch, which "
            "precomputed reference log-probs cannot cover; use reference=copy or adapter_off")
    needs_ref = pcfg.loss not in losses.REFERENCE_FREE

    def ref_model(params, frozen, ref_params):
        if reference_mode == "copy":
            return nnx.merge(graphdef, ref_params, frozen)
        return reference.switch_off_adapters(nnx.merge(graphdef, params, frozen))

    def ref_logps(params, frozen, ref_params, batch):
        if reference_mode == "precomputed":
            return batch["ref_logp"]
        logp, _ = response_logps(ref_model(params, frozen, ref_params), batch)
        return jax.lax.stop_gradient(logp)

    def loss_fn(params, frozen, batch, ref_params, rng):
        model = nnx.merge(graphdef, params, frozen)
        if rng is not None:
            layers.set_dropout_key(model, rng)
        inputs = flat_inputs(batch)
        tok = token_logps(model, inputs)
        seqs = losses.Sequences(logp=jnp.sum(tok * inputs["response"], 1).reshape(-1, 2),
                                tokens=jnp.sum(inputs["response"], 1).reshape(-1, 2))
        if needs_ref:
            seqs = seqs.replace(ref_logp=ref_logps(params, frozen, ref_params, batch))
        if pcfg.loss in ("simpo", "orpo"):
            # SimPO (CPO): NLL of the chosen responses; ORPO (as TRL): of every chosen token.
            mask = inputs["response" if pcfg.loss == "simpo" else "predicted"]
            seqs = seqs.replace(nll=_chosen_nll(tok, mask))
        if pcfg.loss == "kto":
            kl_batch = mismatched(batch)
            policy_kl, _ = response_logps(nnx.merge(graphdef, params, frozen), kl_batch)
            ref_kl, _ = response_logps(ref_model(params, frozen, ref_params), kl_batch)
            seqs = seqs.replace(kl_logratio=jax.lax.stop_gradient(policy_kl - ref_kl).reshape(-1))
        return losses.preference_loss(seqs, pcfg)

    return loss_fn


def make_preference_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, pcfg: Any, *,
                         reference_mode: str, schedule: Callable[[Any], Any] | None = None):
    """Build ``step(state, frozen, batch, ref_params) -> (state, metrics)`` (not yet jitted)."""
    grad_fn = jax.value_and_grad(make_loss_fn(graphdef, pcfg, reference_mode), has_aux=True)

    def step(state: TrainState, frozen: Any, batch: dict[str, jax.Array], ref_params: Any = None):
        (_, metrics), grads = grad_fn(state.params, frozen, batch, ref_params, state.rng)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        lr = optim.peak_learning_rate(opt_state)
        if schedule is not None:
            lr = lr * schedule(state.step)
        metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             rng=jax.random.fold_in(state.rng, state.step)), metrics

    return step
