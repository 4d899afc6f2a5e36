"""Pooling of BERT sequence classifiers (``config.model.pooling = pooler | cls | mean``) against
the same classifier applied in torch to transformers' hidden states, mean pooled as
sentence-transformers does; the default comes from a sentence-transformers
``1_Pooling/config.json`` (atol 1e-5); a value or a model that cannot pool is one clear error."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from ftjax import models, sharding
from ftjax.config import base_config

IDS = np.array([[2, 5, 7, 9, 4, 6], [3, 8, 6, 0, 0, 0]])
MASK = (IDS != 0).astype(np.int64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=37, num_labels=3)
    torch.manual_seed(0)
    ref = transformers.BertForSequenceClassification(cfg).eval()
    folder = tmp_path_factory.mktemp("bert")
    ref.save_pretrained(folder)
    with torch.no_grad():
        h = ref.bert(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).last_hidden_state
        m = torch.tensor(MASK, dtype=h.dtype)[..., None]
        pooled = dict(pooler=ref.bert.pooler(h), cls=h[:, 0],
                      mean=(h * m).sum(1) / m.sum(1).clamp(min=1e-9))  # sentence-transformers' mean
        want = {k: ref.classifier(v).numpy() for k, v in pooled.items()}
    return folder, want


def _model_cfg(source, pooling: str = "", head: str = "sequence_classification"):
    c = base_config().model
    c.update(source=str(source), head=head, pooling=pooling)
    return c


def _logits(folder, pooling: str = "") -> tuple[np.ndarray, str]:
    model, _ = models.create(_model_cfg(folder, pooling),
                             sharding.make_mesh({}, devices=jax.devices()[:1]), num_labels=3)
    return np.asarray(model(IDS, MASK)), model.model.cfg.pooling


@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean"])
def test_pooling_matches_torch(saved, pooling):
    folder, want = saved
    got, _ = _logits(folder, pooling=pooling)
    np.testing.assert_allclose(got, want[pooling], atol=1e-5, rtol=0)


def test_sentence_transformers_pooling_config_sets_the_default(saved, tmp_path):
    folder, want = saved
    assert _logits(folder)[1] == "pooler"  # no 1_Pooling: transformers' own head
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True}))
    got, pooling = _logits(tmp_path)
    assert pooling == "mean"
    np.testing.assert_allclose(got, want["mean"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("source,pooling,head,error", [
    ("tiny-bert", "maen", "sequence_classification",
     r"config.model.pooling='maen'; choose from pooler, cls, mean or ''"),
    ("tiny-bert", "mean", "causal_lm", r"pooling='mean' is for sequence_classification heads"),
    ("tiny-llama", "mean", "sequence_classification", r"llama models have no setting 'pooling'"),
])
def test_a_pooling_the_model_cannot_take_says_so(source, pooling, head, error):
    with pytest.raises(models.ModelConfigError, match=error):
        models.create(_model_cfg(source, pooling, head), sharding.make_mesh({}, devices=jax.devices()[:1]))


def test_the_key_and_the_old_override_spelling_must_agree():
    c = _model_cfg("tiny-bert", "cls")
    c.overrides.pooling = "mean"
    with pytest.raises(models.ModelConfigError, match="set config.model.pooling only"):
        models.create(c, sharding.make_mesh({}, devices=jax.devices()[:1]))
