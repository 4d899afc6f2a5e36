"""Reward models (a 1-output sequence classifier): the Bradley-Terry step against TRL's
``RewardTrainer.compute_loss`` on a tiny HF Llama, and scoring texts against transformers.
float32, ``rtol=atol=2e-5``.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

pytest.importorskip("trl")
from trl.trainer.reward_trainer import RewardTrainer  # noqa: E402

from ftjax.config import base_config  # noqa: E402
from ftjax.models.loading import from_pretrained  # noqa: E402
from ftjax.preference import reward  # noqa: E402
from ftjax.train import optim  # noqa: E402
from ftjax.train.step import TrainState  # noqa: E402

TOL = dict(rtol=2e-5, atol=2e-5)
CFG = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64,
           num_labels=1)
B, L = 4, 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**CFG)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.15)
    folder = tmp_path_factory.mktemp("rm")
    hf.save_pretrained(folder)
    head, n = reward.model_head("reward", 0)
    return hf, from_pretrained(folder, head=head, num_labels=n)[0]


def _batch():
    rng = np.random.default_rng(0)
    length = rng.integers(4, L + 1, size=(B, 2)).astype(np.int32)
    ids = np.zeros((B, 2, L), np.int32)
    for i in range(B):
        for j in range(2):
            ids[i, j, :length[i, j]] = rng.integers(3, 96, length[i, j])
    return dict(input_ids=ids, prompt_len=np.full((B, 2), 2, np.int32), length=length)


def _trl_loss(hf, batch, margin, center):
    """TRL's RewardTrainer.compute_loss: the batch is [chosen..., rejected...]."""
    ids = np.concatenate([batch["input_ids"][:, 0], batch["input_ids"][:, 1]])
    length = np.concatenate([batch["length"][:, 0], batch["length"][:, 1]])
    mask = (np.arange(L)[None] < length[:, None]).astype(np.int64)
    me = SimpleNamespace(model=hf, args=SimpleNamespace(center_rewards_coefficient=center),
                         accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
                         _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    if margin is not None:
        inputs["margin"] = torch.tensor(margin)
    with torch.no_grad():
        loss = RewardTrainer.compute_loss(me, hf, inputs)
    return float(loss), me._metrics["eval"]


@pytest.mark.parametrize("with_margin,center", [(False, None), (True, 0.01)])
def test_bradley_terry_step_matches_trl_reward_trainer(models, with_margin, center):
    hf, model = models
    batch = _batch()
    margin = np.linspace(0.0, 0.6, B).astype(np.float32) if with_margin else None
    want, trl_metrics = _trl_loss(hf, batch, margin, center)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    train = base_config().train
    train.update(dict(optimizer="sgd", learning_rate=0.0))
    tx = optim.make_optimizer(train)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=jax.random.key(0))
    step = jax.jit(reward.make_reward_step(graphdef, tx, center=center or 0.0))
    inputs = dict(batch, **({"margin": margin} if with_margin else {}))
    _, metrics = step(state, frozen, jax.tree.map(jnp.asarray, inputs))
    np.testing.assert_allclose(float(metrics["loss"]), want, **TOL)
    np.testing.assert_allclose(float(metrics["accuracy"]), trl_metrics["accuracy"][-1], **TOL)
    np.testing.assert_allclose(float(metrics["margin"]), trl_metrics["margin"][-1], **TOL)


def test_score_texts_matches_transformers(models):
    """Scoring whole texts (what a generation is scored by), through a stand-in tokenizer."""
    hf, model = models

    class Tok:
        pad_token_id, eos_token_id = 0, 2

        def __call__(self, text, truncation=True, max_length=128):
            return {"input_ids": [3 + (ord(ch) % 90) for ch in text][:max_length]}

    texts = ["a fine film", "dull", "the plot was thin but the acting superb"]
    got = reward.score_texts(model, Tok(), texts, batch_size=2)
    with torch.no_grad():
        want = [float(hf(input_ids=torch.tensor([Tok()(t)["input_ids"]])).logits[0, 0]) for t in texts]
    np.testing.assert_allclose(got, want, **TOL)
