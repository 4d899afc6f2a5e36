"""Preference losses over sequence log-probabilities: DPO and its relatives.

Every loss reads a ``Sequences`` of per-response sums (``[N, 2]``: column 0 the chosen response of
pair ``i``, column 1 the rejected one) and returns ``(loss, metrics)``. The formulas follow TRL
1.16 term for term (``DPOTrainer`` sigmoid / ipo / robust, ``CPOTrainer`` simpo,
``ORPOTrainer``, ``KTOTrainer``), which the tests check on the same inputs:

- ``dpo``: ``-log sigmoid(beta * (lr_c - lr_r))`` with ``lr = log pi - log pi_ref`` (Rafailov et
  al. 2023); ``label_smoothing`` > 0 gives conservative DPO (cDPO: the label flipped with that
  probability, ``-(1-e) log s(z) - e log s(-z)``).
- ``robust``: Robust DPO (Chowdhury et al. 2024), the unbiased loss under label noise ``e``.
- ``ipo``: ``(lr_c / n_c - lr_r / n_r - 1 / (2 beta)) ** 2`` (Azar et al. 2023; per-token as TRL).
- ``simpo``: reference-free, length-normalised ``-log sigmoid(beta (avg_c - avg_r) - gamma)``
  (Meng et al. 2024) plus ``sft_weight`` times the chosen responses' token NLL (CPO's ``cpo_alpha``).
- ``orpo``: chosen NLL minus ``beta * log sigmoid(log odds_c - log odds_r)`` on length-normalised
  log-probs (Hong et al. 2024).
- ``kto``: unpaired (Ethayarajh et al. 2024): desirable ``1 - s(beta (lr - z0))``, undesirable
  ``1 - s(beta (z0 - lr))`` with ``z0`` the clamped mean log-ratio on mismatched prompt/response
  pairs (no gradient).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from ftjax.errors import FtjaxError

REFERENCE_FREE = ("simpo", "orpo")


class PreferenceConfigError(FtjaxError, ValueError):
    """A ``config.preference`` value that does not work."""


@flax.struct.dataclass
class Sequences:
    """Per-response statistics of a batch of pairs; every array is ``[N, 2]`` (chosen, rejected)."""
    logp: jax.Array  # summed log pi(response | prompt)
    tokens: jax.Array  # response tokens
    ref_logp: jax.Array | None = None  # summed log pi_ref (None for reference-free losses)
    nll: jax.Array | None = None  # simpo / orpo: the chosen responses' mean token NLL (scalar)
    kl_logratio: jax.Array | None = None  # kto: log pi - log pi_ref of mismatched pairs [M]
    desirable: jax.Array | None = None  # kto: [N, 2] bool, True for a desirable example


def _avg(s: Sequences) -> jax.Array:
    return s.logp / jnp.maximum(s.tokens, 1.0)


def _logratio(s: Sequences) -> jax.Array:
    return s.logp - s.ref_logp


def _smoothed_sigmoid(z: jax.Array, eps: float) -> jax.Array:
    return -jax.nn.log_sigmoid(z) * (1 - eps) - jax.nn.log_sigmoid(-z) * eps


def dpo(s: Sequences, c) -> tuple[jax.Array, jax.Array]:
    lr = _logratio(s)
    losses = _smoothed_sigmoid(c.beta * (lr[:, 0] - lr[:, 1]), c.label_smoothing)
    return jnp.mean(losses), c.beta * lr


def robust(s: Sequences, c) -> tuple[jax.Array, jax.Array]:
    lr = _logratio(s)
    z, eps = c.beta * (lr[:, 0] - lr[:, 1]), c.label_smoothing
    losses = (-(1 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1 - 2 * eps)
    return jnp.mean(losses), c.beta * lr


def ipo(s: Sequences, c) -> tuple[jax.Array, jax.Array]:
    lr = _logratio(s) / jnp.maximum(s.tokens, 1.0)
    losses = (lr[:, 0] - lr[:, 1] - 1 / (2 * c.beta)) ** 2
    return jnp.mean(losses), c.beta * _logratio(s)


def simpo(s: Sequences, c) -> tuple[jax.Array, jax.Array]:
    avg = _avg(s)
    z = c.beta * (avg[:, 0] - avg[:, 1] - c.simpo_gamma / c.beta)
    loss = jnp.mean(_smoothed_sigmoid(z, c.label_smoothing))
    if c.sft_weight:
        loss = loss + c.sft_weight * s.nll
    return loss, c.beta * avg


def _log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2``."""
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo(s: Sequences, c) -> tuple[jax.Array, jax.Array]:
    avg = _avg(s)
    log_odds = (avg[:, 0] - avg[:, 1]) - (_log1mexp(avg[:, 0]) - _log1mexp(avg[:, 1]))
    return s.nll - c.beta * jnp.mean(jax.nn.log_sigmoid(log_odds)), c.beta * avg


def kto_reference_point(kl_logratio: jax.Array) -> jax.Array:
    """KTO's ``z0``: the mismatched pairs' mean log-ratio, clamped at 0, without gradient."""
    return jnp.maximum(jax.lax.stop_gradient(jnp.mean(kl_logratio)), 0.0)


def kto(s: Sequences, c) -> tuple[jax.Array, jax.Array]:
    lr = _logratio(s)
    z0 = kto_reference_point(s.kl_logratio)
    desirable = s.desirable if s.desirable is not None else jnp.array([[True, False]])
    losses = jnp.where(desirable, c.desirable_weight * (1 - jax.nn.sigmoid(c.beta * (lr - z0))),
                       c.undesirable_weight * (1 - jax.nn.sigmoid(c.beta * (z0 - lr))))
    return jnp.mean(losses), c.beta * lr


LOSSES: dict[str, Callable[[Sequences, Any], tuple[jax.Array, jax.Array]]] = dict(
    dpo=dpo, robust=robust, ipo=ipo, simpo=simpo, orpo=orpo, kto=kto)


def check(c: Any) -> None:
    """One clear error for a ``config.preference`` that cannot work."""
    if c.loss not in LOSSES:
        raise PreferenceConfigError(f"config.preference.loss={c.loss!r}; choose one of {sorted(LOSSES)}")
    if c.beta <= 0:
        raise PreferenceConfigError(f"config.preference.beta={c.beta} must be > 0")
    top = 0.5 if c.loss == "robust" else 1.0
    if not 0.0 <= c.label_smoothing < top:
        raise PreferenceConfigError(f"config.preference.label_smoothing={c.label_smoothing} must lie in "
                                    f"[0, {top}) for loss={c.loss}")
    if c.reference not in ("auto", "adapter_off", "copy", "precomputed"):
        raise PreferenceConfigError(f"config.preference.reference={c.reference!r}; choose auto, "
                                    f"adapter_off, copy or precomputed")


def preference_loss(s: Sequences, c) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The configured loss and its metrics (TRL's names, with ``_`` for ``/``).

    ``reward_*`` are the implicit rewards (``beta * log-ratio``; reference-free losses: ``beta``
    times the mean token log-prob); ``kl_estimate`` is the mean summed log-ratio of the batch's
    responses (KTO: its ``z0``), a sequence-KL estimate when the responses are the policy's own.
    """
    loss, rewards = LOSSES[c.loss](s, c)
    metrics = dict(loss=loss, reward_chosen=jnp.mean(rewards[:, 0]),
                   reward_rejected=jnp.mean(rewards[:, 1]),
                   reward_accuracy=jnp.mean((rewards[:, 0] > rewards[:, 1]).astype(jnp.float32)),
                   reward_margin=jnp.mean(rewards[:, 0] - rewards[:, 1]),
                   logp_chosen=jnp.mean(s.logp[:, 0]), logp_rejected=jnp.mean(s.logp[:, 1]))
    if c.loss == "kto":
        metrics["kl_estimate"] = kto_reference_point(s.kl_logratio)
    elif s.ref_logp is not None:
        metrics["kl_estimate"] = jnp.mean(_logratio(s))
    if s.nll is not None:
        metrics["nll"] = s.nll
    return loss, metrics
