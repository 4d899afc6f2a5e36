"""The full preference step on a tiny random HF Llama against PyTorch through transformers.

The same batch of pairs (prompt + chosen / rejected token ids, padded) goes through the ftjax step
and through ``transformers.LlamaForCausalLM``; the torch side sums response log-probs from its own
logits and applies the published loss formula. Reference policies: a second model's weights as a
frozen copy, the same log-probs precomputed and cached, and (LoRA) the backbone with the adapter
switched off inside the step, compared with HF ``peft``'s ``disable_adapter()``. float32 tolerance
``rtol=atol=2e-5`` on the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx

from ftjax import peft
from ftjax.config import base_config
from ftjax.models.loading import from_pretrained
from ftjax.preference import losses, reference
from ftjax.preference.config import preference_config
from ftjax.preference import step as pstep
from ftjax.train import optim
from ftjax.train.step import TrainState

TOL = dict(rtol=2e-5, atol=2e-5)
CFG = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
B, L = 3, 12


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    out = {}
    for name, seed in (("policy", 0), ("ref", 1)):
        model = _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)), seed)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name], out[name + "_dir"] = model, folder
    return out


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    plen = np.array([[3, 3], [5, 5], [2, 2]], np.int32)
    length = np.array([[9, 7], [12, 8], [4, 10]], np.int32)
    ids = np.zeros((B, 2, L), np.int32)
    for i in range(B):
        prompt = rng.integers(3, 96, plen[i, 0])
        for j in range(2):
            ids[i, j, :plen[i, j]] = prompt
            ids[i, j, plen[i, j]:length[i, j]] = rng.integers(3, 96, length[i, j] - plen[i, j])
    return dict(input_ids=ids, prompt_len=plen, length=length)


def torch_response_logps(model, batch) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(summed response log-probs [B, 2], response tokens [B, 2], chosen response NLL, chosen
    all-token NLL) through transformers."""
    ids = torch.tensor(batch["input_ids"].reshape(2 * B, L), dtype=torch.long)
    length = torch.tensor(batch["length"].reshape(-1))
    plen = torch.tensor(batch["prompt_len"].reshape(-1))
    t = torch.arange(L)
    attn = (t[None] < length[:, None]).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
    tok = torch.gather(F.log_softmax(logits[:, :-1], -1), 2, ids[:, 1:, None])[..., 0]  # predicts t+1
    pos = t[None, 1:]  # the predicted token's index
    resp = ((pos >= plen[:, None]) & (pos < length[:, None])).float()
    real = (pos < length[:, None]).float()
    chosen = torch.arange(2 * B) % 2 == 0
    nll_resp = -(tok * resp)[chosen].sum() / resp[chosen].sum()
    nll_all = -(tok * real)[chosen].sum() / real[chosen].sum()
    return ((tok * resp).sum(1).reshape(B, 2).numpy(), resp.sum(1).reshape(B, 2).numpy(),
            float(nll_resp), float(nll_all))


def _pcfg(**kw) -> ml_collections.ConfigDict:
    c = preference_config()
    c.update(kw)
    return c


def _run_step(model, pcfg, batch, mode, ref_params=None, trainable=nnx.Param):
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    train = base_config().train
    train.update(dict(optimizer="sgd", learning_rate=0.0))
    tx = optim.make_optimizer(train)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=jax.random.key(0))
    step = jax.jit(pstep.make_preference_step(graphdef, tx, pcfg, reference_mode=mode))
    _, metrics = step(state, frozen, jax.tree.map(jnp.asarray, batch), ref_params)
    return {k: float(v) for k, v in metrics.items()}


def _dpo(pol, ref, beta):
    lr = pol - ref
    return float(np.mean(-np.log(1 / (1 + np.exp(-beta * (lr[:, 0] - lr[:, 1]))))))


@pytest.fixture(scope="module")
def ftjax_models(hf):
    return {name: from_pretrained(hf[name + "_dir"])[0] for name in ("policy", "ref")}


def test_dpo_step_with_frozen_copy_matches_transformers(hf, ftjax_models, batch):
    pol, _, _, _ = torch_response_logps(hf["policy"], batch)
    ref, _, _, _ = torch_response_logps(hf["ref"], batch)
    ref_params = nnx.state(ftjax_models["ref"], nnx.Param)
    m = _run_step(ftjax_models["policy"], _pcfg(loss="dpo", beta=0.3), batch, "copy", ref_params)
    np.testing.assert_allclose(m["loss"], _dpo(pol, ref, 0.3), **TOL)
    np.testing.assert_allclose(m["reward_margin"], 0.3 * np.mean((pol - ref)[:, 0] - (pol - ref)[:, 1]), **TOL)
    np.testing.assert_allclose(m["logp_chosen"], pol[:, 0].mean(), **TOL)


def test_dpo_step_with_precomputed_reference_matches_transformers(hf, ftjax_models, batch, tmp_path):
    pol, _, _, _ = torch_response_logps(hf["policy"], batch)
    ref_torch, _, _, _ = torch_response_logps(hf["ref"], batch)
    gd, st = nnx.split(ftjax_models["ref"])
    path = reference.cache_path("data-key", str(hf["ref_dir"]), tmp_path)
    calls = []
    compute = lambda: calls.append(1) or pstep.reference_logps(gd, st, [batch])
    cached = reference.cached(path, compute)
    again = reference.cached(path, compute)  # read back from the file, not recomputed
    assert len(calls) == 1 and path.exists()
    np.testing.assert_array_equal(cached, again)
    np.testing.assert_allclose(cached, ref_torch, **TOL)
    m = _run_step(ftjax_models["policy"], _pcfg(loss="ipo", beta=0.2), dict(batch, ref_logp=cached),
                  "precomputed")
    _, tokens, _, _ = torch_response_logps(hf["policy"], batch)
    lr = (pol - ref_torch) / tokens
    np.testing.assert_allclose(m["loss"], np.mean((lr[:, 0] - lr[:, 1] - 1 / (2 * 0.2)) ** 2), **TOL)


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_steps_match_transformers(hf, ftjax_models, batch, loss):
    pol, tokens, nll_resp, nll_all = torch_response_logps(hf["policy"], batch)
    avg = pol / tokens
    beta = 1.5 if loss == "simpo" else 0.2
    m = _run_step(ftjax_models["policy"], _pcfg(loss=loss, beta=beta, sft_weight=0.5), batch, "copy")
    if loss == "simpo":
        z = beta * (avg[:, 0] - avg[:, 1]) - 0.5
        want = np.mean(np.log1p(np.exp(-z))) + 0.5 * nll_resp
    else:
        log_odds = (avg[:, 0] - avg[:, 1]) - (np.log1p(-np.exp(avg[:, 0])) - np.log1p(-np.exp(avg[:, 1])))
        want = nll_all - beta * np.mean(-np.log1p(np.exp(-log_odds)))
    np.testing.assert_allclose(m["loss"], want, **TOL)


def test_lora_reference_is_the_adapter_switched_off(hf, batch, tmp_path):
    """Policy = base + LoRA (non-zero B), reference = the same model with the adapter off: DPO's
    loss equals HF peft's PeftModel and its disable_adapter() context, with no weight copy."""
    import peft as hf_peft
    model, _ = from_pretrained(hf["policy_dir"])
    method = peft.method_config()
    method.kind = "lora"
    method.lora.rank = 4
    plan = peft.apply_method(model, method)
    for _, lin in reference.adapted_linears(plan.model):  # a trained-looking adapter
        b = lin.lora_b.get_value()
        lin.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(3), b.shape, b.dtype))
    m = _run_step(plan.model, _pcfg(loss="dpo", beta=0.5), batch, reference.resolve("auto", plan.model),
                  trainable=plan.trainable)
    peft.export_peft(plan.model, method, tmp_path / "adapter", str(hf["policy_dir"]))
    base = transformers.LlamaForCausalLM.from_pretrained(hf["policy_dir"]).eval()
    torch_peft = hf_peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    pol, _, _, _ = torch_response_logps(torch_peft, batch)
    with torch_peft.disable_adapter():
        ref, _, _, _ = torch_response_logps(torch_peft, batch)
    assert np.abs(pol - ref).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(m["loss"], _dpo(pol, ref, 0.5), **TOL)
    # The weights of the step's model were never copied: only the adapter is trainable state.
    assert reference.resolve("auto", plan.model) == "adapter_off"


def test_kto_step_on_mismatched_pairs(hf, ftjax_models, batch):
    """KTO's z0 comes from prompt i with the responses of pair i-1 (built inside the step)."""
    mis = jax.tree.map(np.asarray, pstep.mismatched(jax.tree.map(jnp.asarray, batch)))
    for i in range(B):
        k = (i - 1) % B
        for j in range(2):
            p, n = batch["prompt_len"][i, j], mis["length"][i, j]
            want = np.concatenate([batch["input_ids"][i, j, :p],
                                   batch["input_ids"][k, j, batch["prompt_len"][k, j]:batch["length"][k, j]]])[:L]
            np.testing.assert_array_equal(mis["input_ids"][i, j, :n], want)
    pol, _, _, _ = torch_response_logps(hf["policy"], batch)
    ref, _, _, _ = torch_response_logps(hf["ref"], batch)
    pol_kl, _, _, _ = torch_response_logps(hf["policy"], mis)
    ref_kl, _, _, _ = torch_response_logps(hf["ref"], mis)
    beta = 0.4
    z0 = max(np.mean(pol_kl - ref_kl), 0.0)
    lr = pol - ref
    want = np.mean(np.concatenate([1 - 1 / (1 + np.exp(-beta * (lr[:, 0] - z0))),
                                   1 - 1 / (1 + np.exp(-beta * (z0 - lr[:, 1])))]))
    m = _run_step(ftjax_models["policy"], _pcfg(loss="kto", beta=beta), batch, "copy",
                  nnx.state(ftjax_models["ref"], nnx.Param))
    np.testing.assert_allclose(m["kl_estimate"], z0, **TOL)
    np.testing.assert_allclose(m["loss"], want, **TOL)


def test_reference_mode_errors(ftjax_models):
    with pytest.raises(losses.PreferenceConfigError, match="adapter_off needs an adapter method"):
        reference.resolve("adapter_off", ftjax_models["policy"])
    with pytest.raises(losses.PreferenceConfigError, match="loss=kto"):
        pstep.make_preference_step(None, optax.sgd(0.1), _pcfg(loss="kto"), reference_mode="precomputed")
