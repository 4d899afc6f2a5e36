"""Every preference loss against TRL 1.16's own loss code on the same per-token log-probs.

TRL computes its losses inside trainer methods; the tests call those methods on a stand-in
``self`` that holds only the hyper-parameters (and, for DPO/KTO, a stand-in model returning the
given per-token log-probs), so the formulas compared are TRL's, line for line. float32,
``rtol=1e-5, atol=1e-6``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("trl")
from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

from ftjax.preference import losses  # noqa: E402
from ftjax.preference.config import preference_config  # noqa: E402

N, T = 6, 9
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def data():
    """Per-token log-probs of N chosen then N rejected responses (prompt tokens masked)."""
    rng = np.random.default_rng(0)
    logps = -rng.gamma(2.0, 0.3, size=(2 * N, T - 1)).astype(np.float32)
    ref = (logps + rng.normal(0, 0.4, size=logps.shape)).astype(np.float32)
    ref = np.minimum(ref, -1e-3)
    prompt = rng.integers(1, 4, size=2 * N)
    length = rng.integers(2, T - 4, size=2 * N)
    mask = np.zeros((2 * N, T), np.int64)
    for i in range(2 * N):
        mask[i, prompt[i]:prompt[i] + length[i]] = 1
    shift = mask[:, 1:].astype(np.float32)
    return SimpleNamespace(logps=logps * shift, ref=ref * shift, mask=mask, shift=shift)


def _pairs(x: np.ndarray) -> np.ndarray:
    """[2N] (chosen then rejected) -> [N, 2]."""
    return np.stack([x[:N], x[N:]], axis=1)


def _sequences(d, **extra) -> losses.Sequences:
    return losses.Sequences(logp=jnp.asarray(_pairs(d.logps.sum(1))), tokens=jnp.asarray(_pairs(d.shift.sum(1))),
                            ref_logp=jnp.asarray(_pairs(d.ref.sum(1))), **extra)


def _config(**kw):
    c = preference_config()
    c.update(kw)
    return c


class _Accelerator:
    device = "cpu"

    def gather_for_metrics(self, x):
        return x

    gather = gather_for_metrics

    def unwrap_model(self, m):
        return m


class _Model:
    """Stands in for TRL's fused-LM-head forward: returns the given per-token log-probs."""

    def __init__(self, logps):
        self.logps = torch.tensor(logps)
        self.training = True

    def __call__(self, **kw):
        z = torch.zeros_like(self.logps)
        return SimpleNamespace(log_probs=self.logps, entropy=z, mean_logits=z, is_top1=z.bool())


def _trl_self(**kw):
    base = dict(accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None, use_weighting=False,
                precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_weights=[1.0],
                _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                label_smoothing=0.0, alpha=0.0)
    base.update(kw)
    return SimpleNamespace(**base)


def _trl_dpo(d, loss_type: str, beta: float, label_smoothing: float = 0.0) -> float:
    model = _Model(d.logps)
    me = _trl_self(model=model, loss_types=[loss_type], beta=beta, label_smoothing=label_smoothing)
    ref = torch.tensor(d.ref.sum(1))
    inputs = dict(input_ids=torch.zeros(2 * N, T, dtype=torch.long), attention_mask=torch.ones(2 * N, T),
                  completion_mask=torch.tensor(d.mask), ref_chosen_logps=ref[:N], ref_rejected_logps=ref[N:])
    return float(DPOTrainer._compute_loss(me, model, inputs, False))


@pytest.mark.parametrize("loss,beta,eps", [("dpo", 0.1, 0.0), ("dpo", 0.5, 0.0), ("ipo", 0.3, 0.0),
                                           ("robust", 0.2, 0.1)])
def test_dpo_family_matches_trl_dpo_trainer(data, loss, beta, eps):
    trl_name = dict(dpo="sigmoid").get(loss, loss)
    want = _trl_dpo(data, trl_name, beta, eps)
    got, metrics = losses.preference_loss(_sequences(data), _config(loss=loss, beta=beta, label_smoothing=eps))
    np.testing.assert_allclose(float(got), want, **TOL)
    # TRL's DPO metrics: rewards are beta * log-ratio per response.
    lr = data.logps.sum(1) - data.ref.sum(1)
    np.testing.assert_allclose(float(metrics["reward_chosen"]), beta * lr[:N].mean(), **TOL)
    np.testing.assert_allclose(float(metrics["reward_margin"]), beta * (lr[:N] - lr[N:]).mean(), **TOL)
    np.testing.assert_allclose(float(metrics["reward_accuracy"]), np.mean(lr[:N] > lr[N:]), **TOL)
    np.testing.assert_allclose(float(metrics["kl_estimate"]), lr.mean(), **TOL)


def test_conservative_dpo_matches_trl_label_smoothed_sigmoid(data):
    """cDPO: TRL 1.16 keeps the label-smoothed sigmoid in CPO's loss; fed log-ratios it is cDPO."""
    beta, eps = 0.2, 0.15
    lr = torch.tensor(data.logps.sum(1) - data.ref.sum(1))
    me = _trl_self(beta=beta, label_smoothing=eps, loss_type="sigmoid")
    want, _, _ = CPOTrainer.cpo_loss(me, lr[:N], lr[N:])
    got, _ = losses.preference_loss(_sequences(data), _config(loss="dpo", beta=beta, label_smoothing=eps))
    np.testing.assert_allclose(float(got), float(want.mean()), **TOL)


def _avg_logps(d) -> torch.Tensor:
    return torch.tensor(d.logps.sum(1) / d.shift.sum(1))


@pytest.mark.parametrize("sft_weight,eps", [(0.0, 0.0), (0.7, 0.1)])
def test_simpo_matches_trl_cpo_simpo(data, sft_weight, eps):
    beta, gamma, nll = 2.0, 0.8, 1.37
    avg = _avg_logps(data)
    me = _trl_self(beta=beta, label_smoothing=eps, loss_type="simpo", simpo_gamma=gamma, cpo_alpha=sft_weight)
    me.cpo_loss = lambda c, r: CPOTrainer.cpo_loss(me, c, r)
    me.concatenated_forward = lambda model, batch: (avg[:N], avg[N:], torch.zeros(1), torch.zeros(1),
                                                    torch.tensor(nll))
    want, trl_metrics = CPOTrainer.get_batch_loss_metrics(me, None, {})
    got, metrics = losses.preference_loss(
        _sequences(data, nll=jnp.float32(nll)),
        _config(loss="simpo", beta=beta, simpo_gamma=gamma, sft_weight=sft_weight, label_smoothing=eps))
    np.testing.assert_allclose(float(got), float(want), **TOL)
    np.testing.assert_allclose(float(metrics["reward_margin"]), trl_metrics["rewards/margins"], **TOL)
    np.testing.assert_allclose(float(metrics["reward_accuracy"]), trl_metrics["rewards/accuracies"], **TOL)


def test_orpo_matches_trl_orpo_trainer(data):
    beta, nll = 0.25, 2.1
    avg = _avg_logps(data)
    me = _trl_self(beta=beta)
    me.odds_ratio_loss = lambda c, r: ORPOTrainer.odds_ratio_loss(me, c, r)
    me.concatenated_forward = lambda model, batch: (avg[:N], avg[N:], torch.zeros(1), torch.zeros(1),
                                                    torch.tensor(nll))
    want, trl_metrics = ORPOTrainer.get_batch_loss_metrics(me, None, {})
    got, metrics = losses.preference_loss(_sequences(data, nll=jnp.float32(nll)), _config(loss="orpo", beta=beta))
    np.testing.assert_allclose(float(got), float(want), **TOL)
    np.testing.assert_allclose(float(metrics["reward_chosen"]), trl_metrics["rewards/chosen"], **TOL)
    # log1mexp on both sides of -log 2 (near-zero log-probs are where a naive log(1-exp) fails).
    x = np.array([-1e-4, -0.3, -0.69, -0.7, -5.0, -40.0], np.float32)
    from trl.experimental.orpo.orpo_trainer import log1mexp
    np.testing.assert_allclose(np.asarray(losses._log1mexp(jnp.asarray(x))), log1mexp(torch.tensor(x)).numpy(),
                               rtol=1e-5)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.3, 0.6)])
def test_kto_matches_trl_kto_trainer(data, weights):
    """KTO on the pairs as unpaired data: chosen desirable, rejected undesirable; z0 from given
    mismatched-pair log-probs."""
    beta = 0.3
    rng = np.random.default_rng(1)
    kl_policy = (-rng.gamma(3.0, 1.0, 2 * N)).astype(np.float32)
    kl_ref = (kl_policy - np.abs(rng.normal(0.5, 0.3, 2 * N))).astype(np.float32)  # z0 > 0 (not clamped)
    model = _Model(data.logps)
    me = _trl_self(model=model, beta=beta, loss_type="kto", calculate_KL=True,
                   desirable_weight=weights[0], undesirable_weight=weights[1])
    me._compute_kl_logps = lambda m, b: torch.tensor(kl_policy)
    inputs = dict(input_ids=torch.zeros(2 * N, T, dtype=torch.long), attention_mask=torch.ones(2 * N, T),
                  completion_mask=torch.tensor(data.mask), label=torch.tensor([True] * N + [False] * N),
                  ref_logps=torch.tensor(data.ref.sum(1)), ref_KL_logps=torch.tensor(kl_ref))
    want = float(KTOTrainer._compute_loss(me, model, inputs, False))
    got, metrics = losses.preference_loss(
        _sequences(data, kl_logratio=jnp.asarray(kl_policy - kl_ref)),
        _config(loss="kto", beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1]))
    np.testing.assert_allclose(float(got), want, **TOL)
    np.testing.assert_allclose(float(metrics["kl_estimate"]), me._metrics["train"]["kl"][-1], **TOL)
    np.testing.assert_allclose(float(metrics["reward_margin"]), me._metrics["train"]["rewards/margins"][-1],
                               rtol=1e-5, atol=1e-5)


def test_bad_config_is_one_clear_error():
    with pytest.raises(losses.PreferenceConfigError, match="config.preference.loss='dpoo'"):
        losses.check(_config(loss="dpoo"))
    with pytest.raises(losses.PreferenceConfigError, match=r"label_smoothing=0.6 must lie in \[0, 0.5\)"):
        losses.check(_config(loss="robust", label_smoothing=0.6))
