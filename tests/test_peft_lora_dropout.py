"""LoRA dropout (``config.method.lora.dropout``) against Hugging Face ``peft``'s ``lora_dropout``.

Layer level: PEFT's own LoRA (and DoRA) layer in training mode, its dropout replaced by a module
multiplying by ftjax's mask / (1 - p), gives ftjax's training output; without a dropout key
(evaluation) ftjax gives PEFT's eval output, bit for bit what the same adapter without dropout
gives. Train step: with SGD on a one-token batch a row of ``lora_a``'s update is exactly zero
where that layer's mask dropped the input feature, so the updates show the masks: about ``p`` of
the rows, a different set in each scanned layer and at each step, none without dropout (Llama and
BERT). A decoder with LoRA dropout trains on the 2x4 mesh; the PEFT export carries the rate; the
config key is checked and a resume may not change it.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft as hf_peft
import pytest
import torch
from etils import epath
from flax import nnx

from ftjax import peft, sharding
from ftjax.config import base_config, finalize
from ftjax.models import layers
from ftjax.models.loading import from_pretrained
from ftjax.peft import surgery
from ftjax.peft.lora import LoRALinear
from ftjax.train import optim, resume
from ftjax.train.step import TrainState, make_train_step
from tests import test_peft_zoo as zoo
from tests.test_peft_zoo import (IN, ftjax_linear, randomize_adapter, tiny_llama_2x4,  # noqa: F401
                                 torch_linear)

P = 0.3
ATOL = 2e-6  # float32 layer outputs of size ~1


class FixedMask(torch.nn.Module):
    """Stands in for PEFT's ``nn.Dropout``: the given keep mask, scaled by 1 / (1 - p)."""

    def __init__(self, keep: np.ndarray, p: float):
        super().__init__()
        self.scale = torch.tensor(keep / (1.0 - p), dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def layer_pair(dora: bool, dropout: float) -> tuple[torch.nn.Module, LoRALinear]:
    """PEFT's LoRA layer with random adapter tensors and ftjax's holding the same ones."""
    lin = torch_linear()
    cfg = hf_peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=dora)
    hf_layer = hf_peft.tuners.lora.Linear(lin, "default", config=cfg, r=4, lora_alpha=8)
    tensors = randomize_adapter(hf_layer)
    ours = LoRALinear(ftjax_linear(lin), rank=4, alpha=8, dora=dora, dropout=dropout,
                      key=jax.random.key(0))
    ours.lora_a[...] = jnp.asarray(tensors["lora_A.weight"].T)
    ours.lora_b[...] = jnp.asarray(tensors["lora_B.weight"].T)
    if dora:
        ours.magnitude[...] = jnp.asarray(tensors["lora_magnitude_vector.weight"])
    return hf_layer, ours


@pytest.mark.parametrize("dora", [False, True])
def test_layer_matches_peft_with_the_same_mask(dora):
    hf_layer, ours = layer_pair(dora, P)
    x = np.random.default_rng(0).standard_normal((3, 5, IN)).astype(np.float32)
    with torch.no_grad():
        eval_out = hf_layer.eval()(torch.tensor(x)).numpy()
    # evaluation (no key installed): PEFT's eval output, and exactly the output without dropout
    got_eval = np.asarray(ours(jnp.asarray(x)))
    np.testing.assert_allclose(got_eval, eval_out, atol=ATOL, rtol=0)
    _, no_dropout = layer_pair(dora, 0.0)
    np.testing.assert_array_equal(got_eval, np.asarray(no_dropout(jnp.asarray(x))))

    layers.set_dropout_key(ours, jax.random.key(7))
    keep = np.asarray(ours.lora_dropout(jnp.ones(x.shape))) != 0  # the mask ftjax draws for x
    assert 0.5 < keep.mean() < 0.9
    hf_layer.lora_dropout["default"] = FixedMask(keep, P)
    with torch.no_grad():
        expected = hf_layer.train()(torch.tensor(x)).numpy()
    assert np.abs(expected - eval_out).max() > 1e-2  # the mask matters
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# the masks inside the train step, read from SGD updates on a one-token batch
# ---------------------------------------------------------------------------------------------

SETUPS = {  # family -> (preset, head, loss kind, LoRA targets); value projections see the token
    "llama": ("tiny-llama", "causal_lm", "lm", r"v_proj$"),
    "bert": ("tiny-bert", "sequence_classification", "classification", r"self/value$"),
}


def sgd_updates(family: str, dropout: float, steps: int = 2) -> list[np.ndarray]:
    """``lora_a``'s update ``[L, in, r]`` at each of ``steps`` SGD steps."""
    source, head, kind, targets = SETUPS[family]
    mesh = sharding.make_mesh({}, devices=jax.devices()[:1])
    model = from_pretrained(source, head=head, num_labels=2, mesh=mesh, vocab_size=256)[0]
    m = base_config().method
    m.kind = "lora"
    m.lora.update(rank=4, targets=targets, dropout=dropout)
    plan = peft.apply_method(model, m)
    (_, lin), = surgery.find(plan.model, LoRALinear)
    lin.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(1), lin.lora_b.shape)  # A gets a gradient
    graphdef, params, frozen = nnx.split(plan.model, plan.trainable, ...)
    a_path, = [p for p, _ in nnx.to_flat_state(params) if p[-1] == "lora_a"]
    tcfg = base_config().train
    tcfg.update(optimizer="sgd", learning_rate=1.0, warmup_steps=0, schedule="constant", steps=10,
                grad_clip=0.0)
    tx = optim.make_optimizer(tcfg, **plan.optimizer_kwargs())
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.key(0))
    ids = np.array([[5]])
    batch = dict(input_ids=ids, segment_ids=np.ones_like(ids), positions=np.zeros_like(ids),
                 targets=np.array([[7]]), loss_mask=np.ones_like(ids), labels=np.array([1]),
                 example_mask=np.ones(1))
    step = jax.jit(make_train_step(graphdef, tx, kind=kind))
    out = []
    for _ in range(steps):
        before = np.asarray(dict(nnx.to_flat_state(state.params))[a_path][...])
        state, _ = step(state, frozen, batch)
        out.append(np.asarray(dict(nnx.to_flat_state(state.params))[a_path][...]) - before)
    return out


@pytest.mark.parametrize("family", sorted(SETUPS))
def test_each_layer_and_step_draws_its_own_mask(family):
    dropped = [np.all(u == 0, axis=-1) for u in sgd_updates(family, 0.5)]  # [L, in] per step
    for d in dropped:
        assert d.shape[0] == 2 and np.all((d.mean(-1) > 0.25) & (d.mean(-1) < 0.75)), d.mean(-1)
        assert (d[0] != d[1]).any()  # each scanned layer has its own mask
    assert (dropped[0] != dropped[1]).any()  # each step draws new masks
    without, = sgd_updates(family, 0.0, steps=1)
    assert not np.all(without == 0, axis=-1).any()  # without dropout every row learns


def test_decoder_with_lora_dropout_trains_on_a_2x4_mesh(tiny_llama_2x4, monkeypatch):  # noqa: F811
    """test_peft_zoo's check (a fresh adapter is exact, then learns) with LoRA dropout on."""
    monkeypatch.setitem(zoo.TRAIN, "lora", dict(lora=dict(dropout=0.1)))
    zoo.test_fresh_adapter_is_exact_and_learns_on_a_2x4_mesh(tiny_llama_2x4, "lora")


def test_peft_export_carries_lora_dropout(tiny_llama_2x4, tmp_path):  # noqa: F811
    base = tiny_llama_2x4[0]
    m = base_config().method
    m.kind = "lora"
    m.lora.dropout = 0.1
    plan = peft.apply_method(nnx.clone(base), m)
    peft.export_peft(plan.model, m, tmp_path, "tiny-llama")
    assert hf_peft.LoraConfig.from_pretrained(str(tmp_path)).lora_dropout == 0.1
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft.method_from_peft(config, base).lora.dropout == 0.1


def test_dropout_key_is_checked_and_fixed_on_resume(tmp_path):
    config = finalize(base_config())
    assert config.method.lora.dropout == 0.0
    with pytest.raises(AttributeError, match="dropout"):
        config.method.lora.droput = 0.1  # a typo names the key
    with pytest.raises(ValueError, match=r"config.method.lora.dropout=1.0"):
        LoRALinear(ftjax_linear(torch_linear()), rank=2, alpha=2, dropout=1.0, key=jax.random.key(0))
    workdir = epath.Path(tmp_path)
    (workdir / "checkpoints" / "1").mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json_best_effort())
    changed = finalize(base_config())
    changed.method.lora.dropout = 0.1
    with pytest.raises(resume.ResumeConfigError, match="method.lora.dropout"):
        resume.check(workdir, changed)
