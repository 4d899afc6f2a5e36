"""The controlled-sentiment experiment (configs/dpo_sentiment.py) end to end on tiny random
models in-process: classifier, SFT, pairs, a LoRA-DPO arm, held-out evaluation and the
report; the sampled log-probs behind the KL equal transformers' on the saved policies, and a
rerun trains nothing. The win-rate / Wilson statistics against hand and scipy values."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from transformers import AutoModelForCausalLM

from ftjax.configs import dpo_sentiment as config_file
from ftjax.experiments import dpo_sentiment, dpo_sentiment_report
from ftjax.preference import policy_eval

ARG = ("policy=tiny-llama,classifier=tiny-bert,clf_steps=2,clf_batch=8,clf_seq_len=32,sft_steps=2,"
       "sft_batch=8,sft_seq_len=32,prompts=4,eval_prompts=8,new_tokens=4,losses=dpo,methods=lora,seeds=1,"
       "steps=2,batch=2,seq_len=24,lr=0.05")  # two steps must move a random tiny model


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    c = config_file.get_config(ARG)
    for run in (c.sentiment.classifier, c.sentiment.sft):
        run.eval.max_batches = 1
        run.log.tensorboard = False
    c.log.tensorboard = False
    workdir = tmp_path_factory.mktemp("sentiment")
    return c, workdir, dpo_sentiment.run(c, workdir)


def _torch_logps(folder, prompts, responses) -> np.ndarray:
    """Summed log p(response | prompt) by transformers (float32, one sequence at a time)."""
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = torch.tensor([p + r])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            out.append(float(logp[torch.arange(len(p) - 1, len(p) + len(r) - 1), ids[0, len(p):]].sum()))
    return np.asarray(out)


def test_pipeline_writes_pairs_arms_eval_and_report(experiment):
    c, wd, summary = experiment
    pairs = [json.loads(line) for line in (wd / "pairs" / "train.jsonl").read_text().splitlines()]
    assert len(pairs) == 4 and all(p["reward_chosen"] >= p["reward_rejected"] for p in pairs)
    assert all(0 <= p["reward_rejected"] and p["reward_chosen"] <= 1 for p in pairs)
    assert len({p["prompt"] for p in pairs}) == 4 and all(len(p["prompt"].split()) == 3 for p in pairs)
    run = json.loads((wd / "arms" / "dpo-lora-s0" / "run_summary.json").read_text())
    assert run["steps"] == 2 and run["reference"] == "precomputed"
    assert list((wd / "pairs" / "cache").glob("reference-logps-*.npy"))  # shared beside the pairs

    sft = json.loads((wd / "eval" / "sft.json").read_text())
    assert sft["kl"] == 0.0 and len(sft["reward"]) == 8
    with open(wd / "results.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"dpo-lora-s0"}
    for name, row in rows.items():
        ev = json.loads((wd / "eval" / f"{name}.json").read_text())
        # The KL's two log-probs, recomputed by transformers on the saved HF folders.
        logp = _torch_logps(wd / "arms" / name / "model", ev["prompt_ids"], ev["response_ids"])
        logp_sft = _torch_logps(wd / "sft" / "policy", ev["prompt_ids"], ev["response_ids"])
        np.testing.assert_allclose(ev["logp"], logp, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(ev["logp_sft"], logp_sft, rtol=1e-5, atol=1e-4)
        assert float(row["kl"]) == pytest.approx(np.mean(logp - logp_sft), abs=1e-4)
        assert abs(float(row["kl"])) > 1e-4  # the arm's own policy, not the SFT one
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ev["reward"], sft["reward"])]
        assert float(row["win_rate"]) == pytest.approx(sum(wins) / 8)
    report = (wd / "report.md").read_text()
    assert "| dpo-lora | 1 |" in report and "reward_kl.png" in report
    assert (wd / "reward_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [g["group"] for g in summary["groups"]] == ["dpo-lora"]


def test_rerun_skips_every_finished_stage(experiment, monkeypatch):
    c, wd, summary = experiment

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("train", "load_trained"):
        monkeypatch.setattr(dpo_sentiment.loop, name, refuse)
    monkeypatch.setattr(dpo_sentiment, "preference_train", refuse)
    monkeypatch.setattr(dpo_sentiment, "Generator", refuse)
    monkeypatch.setattr(dpo_sentiment, "from_pretrained", refuse)
    assert dpo_sentiment.run(c, wd)["arms"] == summary["arms"]


def test_win_rate_wilson_and_pooled_groups_by_hand():
    assert policy_eval.win_rate([0.9, 0.2, 0.5, 0.7], [0.1, 0.3, 0.5, 0.6]) == (0.625, 4)  # 2 wins, 1 tie
    assert policy_eval.sequence_kl([-1.0, -2.0, -3.0], [-1.5, -2.0, -2.0]) == pytest.approx(-1 / 6)
    for k, n in ((0, 5), (3, 8), (40, 64), (64, 64)):
        ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        np.testing.assert_allclose(policy_eval.wilson_interval(k / n, n), (ci.low, ci.high), atol=1e-9)
    # Two seeds of one group: 2/4 and 3/4 wins pool to 5/8 over 8 comparisons.
    rows = [dict(group="dpo-lora", mean_reward=0.6, kl=1.0, win_rate=0.5, n=4),
            dict(group="dpo-lora", mean_reward=0.8, kl=3.0, win_rate=0.75, n=4)]
    (g,) = dpo_sentiment_report.groups(rows)
    ci = scipy_stats.binomtest(5, 8).proportion_ci(method="wilson")
    assert (g["seeds"], g["n"], g["win_rate"]) == (2, 8, 0.625)
    assert g["reward"] == pytest.approx(0.7) and g["reward_std"] == pytest.approx(np.sqrt(0.02))
    assert g["kl"] == pytest.approx(2.0) and g["kl_std"] == pytest.approx(np.sqrt(2.0))
    np.testing.assert_allclose(g["win_ci"], (ci.low, ci.high), atol=1e-9)
