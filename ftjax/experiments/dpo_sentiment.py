"""The DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, sec. 6.1) as stages.

``config.sentiment`` (configs/dpo_sentiment.py) holds the classifier and SFT run configs, the
arms and the sizes; the rest of the config is what every preference arm shares. Stages, each
cached in the workdir (a rerun skips what is finished, and a stage killed half-way runs again):

1. ``classifier/``: the sentiment classifier (an ordinary train-loop run); reward = P(positive).
2. ``sft/``: the SFT run on the review sentences; ``sft/policy/`` its merged HF folder, the policy
   every arm starts from and is measured against.
3. ``pairs/train.jsonl``: two sampled completions per train prompt (a review prefix), ranked by
   the classifier: the ``prompt``/``chosen``/``rejected`` rows ``data.task="preference"`` reads.
4. ``eval/sft.json``, then per arm ``arms/<name>/`` (one preference run,
   ``ftjax.preference.train``, from the SFT policy) and ``eval/<name>.json``: one sampled
   completion per held-out prompt, its reward and its log-probs under the policy and the SFT
   policy.
5. ``report.md``, ``results.csv``, ``reward_kl.png`` (``dpo_sentiment_report``).
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from ftjax import peft
from ftjax.data import sources
from ftjax.experiments import dpo_sentiment_report
from ftjax.generate import Generator
from ftjax.models.loading import from_pretrained
from ftjax.models.saving import save_pretrained
from ftjax.paths import as_path
from ftjax.preference import policy_eval, reward
from ftjax.preference.train import train as preference_train
from ftjax.train import loop

SFT = "sft"


def _say(text: str) -> None:
    print(f"[dpo_sentiment] {text}", flush=True)


def _write_json(path: epath.Path, value: Any) -> None:
    """Write through a temporary name, so a file that exists is complete."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


class Timings:
    """Wall time of every stage that ran, kept in ``timings.json`` across reruns."""

    def __init__(self, path: epath.Path):
        self.path = path
        self.values = json.loads(path.read_text()) if path.exists() else {}

    def record(self, stage: str, seconds: float) -> None:
        self.values[stage] = round(seconds, 1)
        _write_json(self.path, self.values)


# -- stages 1-2: the classifier and the SFT policy -------------------------------------------------

def train_run(cfg: ml_collections.ConfigDict, run_dir: epath.Path, what: str, timings: Timings) -> dict:
    """A train-loop run, skipped when its final eval is there (``loop.train`` resumes otherwise)."""
    path = run_dir / "eval" / "metrics.json"
    if path.exists() and json.loads(path.read_text()).get("step") == cfg.train.steps:
        _say(f"{what}: done ({run_dir})")
        return json.loads(path.read_text())
    _say(f"{what}: training {cfg.train.steps} steps -> {run_dir}")
    start = time.time()
    metrics = loop.train(cfg, run_dir)
    timings.record(what, time.time() - start)
    return metrics


def export_policy(cfg: ml_collections.ConfigDict, run_dir: epath.Path) -> epath.Path:
    """``run_dir/policy``: the SFT run's trained model, adapters merged, as an HF folder."""
    out = run_dir / "policy"
    if not out.exists():
        exp, _ = loop.load_trained(cfg, run_dir)
        tmp = run_dir / "policy.tmp"
        save_pretrained(peft.merge_and_unload(exp.model), os.fspath(tmp), exp.tokenizer)
        tmp.rename(out)
    return out


def classifier_scorer(cfg: ml_collections.ConfigDict, run_dir: epath.Path, positive: str
                      ) -> Callable[[list[str]], np.ndarray]:
    """``texts -> P(positive)`` of the trained classifier (loaded on first use)."""
    held: dict = {}

    def score(texts: list[str]) -> np.ndarray:
        if not held:
            exp, _ = loop.load_trained(cfg, run_dir)
            held.update(model=peft.merge_and_unload(exp.model), tokenizer=exp.tokenizer,
                        column=list(cfg.data.label_names).index(positive))
        logits = reward.text_logits(held["model"], held["tokenizer"], texts, batch_size=32,
                                    max_len=cfg.data.seq_len)
        return np.asarray(jax.nn.softmax(logits, axis=-1)[:, held["column"]], np.float64)

    return score


# -- stage 3: prompts and preference pairs ----------------------------------------------------------

def prompts(data_cfg: ml_collections.ConfigDict, split: str, words: int, n: int, seed: int) -> list[str]:
    """``n`` distinct review prefixes (first ``words`` words of sentences with more to say),
    drawn in a seeded order from ``split`` of the SFT data."""
    seen: dict[str, None] = {}
    for rec in sources.read_split(data_cfg, split):
        tokens = rec.text.split()
        if len(tokens) > words + 1:
            seen.setdefault(" ".join(tokens[:words]), None)
    out = list(seen)
    np.random.default_rng(seed).shuffle(out)
    if len(out) < n:
        raise ValueError(f"config.sentiment asks for {n} {split} prompts; {split} has {len(out)} distinct prefixes")
    return out[:n]


def _texts(tokenizer: Any, prompt_ids: list[list[int]], samples: list[list[Any]]) -> list[str]:
    """Prompt + completion as one text per sample (what the classifier reads)."""
    return [tokenizer.decode(list(p) + list(g.tokens), skip_special_tokens=True)
            for p, gs in zip(prompt_ids, samples) for g in gs]


def make_pairs(s: ml_collections.ConfigDict, policy: Callable[[], tuple[Any, Any]], score, out: epath.Path
               ) -> dict:
    """Two completions per train prompt from the SFT policy, the higher reward chosen."""
    model, tok = policy()
    texts = prompts(s.sft.data, "train", s.prefix_words, s.prompts, s.seed)
    gen = Generator(model, tok, max_batch=s.sample_batch)
    ids = [gen.encode(p) for p in texts]
    samples = policy_eval.sample(gen, ids, samples=2, max_new_tokens=s.max_new_tokens,
                                 temperature=s.temperature, seed=s.seed)
    r = score(_texts(tok, ids, samples)).reshape(-1, 2)
    rows = []
    for p, (a, b), (ra, rb) in zip(texts, samples, r):
        (c, rc), (j, rj) = sorted([(a, ra), (b, rb)], key=lambda x: -x[1])
        rows.append(dict(prompt=p, chosen=c.text, rejected=j.text, reward_chosen=rc, reward_rejected=rj))
    tmp = out.parent / (out.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.rename(out)
    return dict(pairs=len(rows), identical=sum(x["chosen"] == x["rejected"] for x in rows),
                reward_chosen=float(r.max(1).mean()), reward_rejected=float(r.min(1).mean()))


# -- stage 4: the preference arms -------------------------------------------------------------------

def arm_config(config: ml_collections.ConfigDict, arm: dict, policy_dir: epath.Path, pairs: epath.Path
               ) -> ml_collections.ConfigDict:
    """The preference run of one arm: the shared settings, the SFT policy, the pairs, the overrides."""
    c = copy.deepcopy(config)
    with c.unlocked():
        del c["sentiment"]
    c.model.source = os.fspath(policy_dir)
    c.data.train_path, c.data.eval_path = os.fspath(pairs), ""
    c.data.cache_dir = os.fspath(pairs.parent / "cache")  # reference log-probs shared by seeds
    c.update_from_flattened_dict(dict(arm["overrides"]))
    return c


# -- stage 5: held-out evaluation -------------------------------------------------------------------

def evaluate_policy(s: ml_collections.ConfigDict, model: Any, tok: Any, sft_model: Any, texts: list[str],
                    score) -> dict:
    """One sampled completion per held-out prompt: its token ids, reward, log pi and log pi_sft
    (lists), and the means."""
    gen = Generator(model, tok, max_batch=s.sample_batch)
    ids = [gen.encode(p) for p in texts]
    samples = policy_eval.sample(gen, ids, samples=1, max_new_tokens=s.max_new_tokens,
                                 temperature=s.temperature, seed=s.seed + 1_000_003)
    responses = [policy_eval.with_stop(g[0], tok) for g in samples]
    logp = policy_eval.sequence_logps(model, ids, responses)
    logp_sft = logp if sft_model is model else policy_eval.sequence_logps(sft_model, ids, responses)
    rewards = score(_texts(tok, ids, samples))
    return dict(prompts=texts, completions=[g[0].text for g in samples], prompt_ids=ids,
                response_ids=responses, reward=rewards.tolist(),
                logp=logp.tolist(), logp_sft=logp_sft.tolist(), mean_reward=float(rewards.mean()),
                kl=policy_eval.sequence_kl(logp, logp_sft))


# -- the whole experiment ---------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Run (or finish) every stage in ``workdir``; returns the report's summary."""
    wd = as_path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    s = config.sentiment
    timings = Timings(wd / "timings.json")
    for d in ("pairs", "arms", "eval"):
        (wd / d).mkdir(exist_ok=True)

    train_run(s.classifier, wd / "classifier", "classifier", timings)
    score = classifier_scorer(s.classifier, wd / "classifier", s.positive_label)
    train_run(s.sft, wd / SFT, SFT, timings)
    policy_dir = export_policy(s.sft, wd / SFT)
    held: dict = {}

    def sft_policy() -> tuple[Any, Any]:
        if not held:
            held["policy"] = from_pretrained(os.fspath(policy_dir))
        return held["policy"]

    pairs = wd / "pairs" / "train.jsonl"
    if pairs.exists():
        _say(f"pairs: done ({pairs})")
    else:
        _say(f"pairs: {s.prompts} prompts x 2 completions of <= {s.max_new_tokens} tokens")
        start = time.time()
        _write_json(wd / "pairs" / "summary.json", make_pairs(s, sft_policy, score, pairs))
        timings.record("pairs", time.time() - start)

    texts = prompts(s.sft.data, "eval", s.prefix_words, s.eval_prompts, s.seed)
    results: dict[str, dict] = {}

    def evaluate(name: str, model_dir: epath.Path | None) -> None:
        path = wd / "eval" / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
            return
        _say(f"eval {name}: {len(texts)} held-out prompts")
        start = time.time()
        sft_model, sft_tok = sft_policy()
        model, tok = (sft_model, sft_tok) if model_dir is None else from_pretrained(os.fspath(model_dir))
        results[name] = evaluate_policy(s, model, tok, sft_model, texts, score)
        _write_json(path, results[name])
        timings.record(f"eval {name}", time.time() - start)

    evaluate(SFT, None)
    arms = [dict(a) for a in s.arms]
    for i, arm in enumerate(arms):  # seed-major: a first seed is complete before the next starts
        run_dir = wd / "arms" / arm["name"]
        if (run_dir / "run_summary.json").exists():
            _say(f"arm {i + 1}/{len(arms)} {arm['name']}: done")
        else:
            _say(f"arm {i + 1}/{len(arms)} {arm['name']}: {config.train.steps} steps")
            start = time.time()
            preference_train(arm_config(config, arm, policy_dir, pairs), run_dir)
            timings.record(f"arm {arm['name']}", time.time() - start)
        evaluate(arm["name"], run_dir / "model")
    summary = dpo_sentiment_report.write(wd, arms, results, timings.values)
    _say(f"report: {wd / 'report.md'}")
    return summary
