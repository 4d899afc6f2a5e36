"""In-context few-shot evaluation: k demonstrations per label in the prompt, labels scored by
log-likelihood.

This is the baseline k-shot fine-tuning is compared against, so every piece is shared with it:
draw ``d``'s demonstrations are exactly the train split that ``config.data.kshot`` (k, seed,
draw=d) gives a fine-tuning run, each encoded as text_to_text trains on it (prompt template +
verbaliser + EOS); the queries and label options are text_to_text's eval prompts and
verbalisers; scoring is the Evaluator's verbaliser path (all options of a batch in one jitted
call). Contextual calibration (Zhao et al., 2021) divides p(label | demos, x) by the mean
p(label | demos, content-free x), i.e. subtracts log p_cf from the options' log-likelihoods.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from scipy.special import log_softmax, logsumexp

from ftjax.data import encode, packing, prepare
from ftjax.data.records import DataError, Record
from ftjax.eval.loop import Evaluator

SUMMARY_METRICS = ("accuracy", "f1_macro", "f1_micro")


@dataclasses.dataclass
class Episode:
    """One draw's token ids: the demonstrations context, the queries and the label options."""
    draw: int
    demonstrations: list[np.ndarray]  # each demo's ids (prompt + verbaliser), in context order
    context: np.ndarray  # demonstrations joined, each followed by the separator
    queries: list[np.ndarray]  # context + each eval prompt
    labels: np.ndarray
    content_free: list[np.ndarray]  # context + each content-free prompt
    options: list[list[int]]
    label_names: list[str]


def _draw_config(data_cfg: ml_collections.ConfigDict, k: int, draw: int) -> ml_collections.ConfigDict:
    if data_cfg.task != "text_to_text":
        raise DataError(f"in-context evaluation scores verbalisers: it needs config.data.task="
                        f"'text_to_text' (with prompt_template and verbalizers), not {data_cfg.task!r}")
    if data_cfg.mixture.tasks:
        raise DataError("in-context evaluation takes one task; config.data.mixture.tasks is set")
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.kshot.k, cfg.kshot.draw = k, draw
    return cfg


def _prompt(example: encode.Example) -> np.ndarray:
    return example.ids[:example.prompt_len]


def build_episode(data_cfg: ml_collections.ConfigDict, tokenizer: Any, icl_cfg: ml_collections.ConfigDict,
                  draw: int) -> Episode:
    """Demonstrations of ``draw`` (the pipeline's k-shot sampler), shuffled by (kshot.seed, draw)."""
    cfg = _draw_config(data_cfg, icl_cfg.k, draw)
    prepared = prepare.prepare(cfg, tokenizer)
    if "eval" not in prepared.examples:
        raise DataError("in-context evaluation needs an eval split (config.data.eval_path, hf or tfds)")
    demos = prepared.examples["train"] if icl_cfg.k else []
    order = np.random.default_rng([cfg.kshot.seed, draw, 1]).permutation(len(demos))
    demos = [demos[i].ids for i in order]
    separator = tokenizer(icl_cfg.separator, add_special_tokens=False)["input_ids"] if demos else []
    context = np.asarray([t for d in demos for t in [*d, *separator]], np.int32)
    evals = prepared.examples["eval"]
    if icl_cfg.max_examples:
        evals = evals[:icl_cfg.max_examples]
    neutral = [Record(where=f"content_free[{i}]", text=t, text_pair=t, label=prepared.labels[0])
               for i, t in enumerate(icl_cfg.content_free)]
    neutral, _ = encode.encode(cfg, tokenizer, neutral, prepared.labels)
    return Episode(draw=draw, demonstrations=demos, context=context,
                   queries=[np.concatenate([context, _prompt(e)]) for e in evals],
                   labels=np.asarray([e.label for e in evals], np.int32),
                   content_free=[np.concatenate([context, _prompt(e)]) for e in neutral],
                   options=encode.verbalizer_ids(cfg, tokenizer, prepared.labels),
                   label_names=prepared.label_names)


def choice_batches(prompts: list[np.ndarray], labels: np.ndarray, options: list[list[int]],
                   batch_size: int, length: int, pad_id: int) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape ``choice_*`` batches (one compile); the last is padded with masked rows."""
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        n = len(chunk)
        chunk += [np.zeros(1, np.int32)] * (batch_size - n)
        allowed = np.zeros((batch_size, len(options)), np.float32)
        allowed[:n] = 1.0
        batch = packing.choice_arrays(chunk, options, allowed, [length], pad_id)
        batch["labels"] = np.zeros(batch_size, np.int32)
        batch["labels"][:n] = labels[start:start + n]
        batch["example_mask"] = (np.arange(batch_size) < n).astype(np.float32)
        yield batch


def calibration_bias(content_free_scores: np.ndarray) -> np.ndarray:
    """``log p_cf``: the log of the mean (over content-free inputs) label distribution ``[C]``."""
    probs = log_softmax(np.asarray(content_free_scores, np.float64), axis=-1)
    return logsumexp(probs, axis=0) - np.log(len(probs))


def _mean_std(rows: list[dict], prefix: str = "") -> dict[str, float]:
    out = {}
    for name in SUMMARY_METRICS:
        values = np.asarray([r[name] for r in rows], np.float64)
        out[f"{prefix}{name}_mean"] = float(values.mean())
        out[f"{prefix}{name}_std"] = float(values.std())
    return out


def evaluate_incontext(model: nnx.Module, tokenizer: Any, config: ml_collections.ConfigDict,
                       mesh: Mesh) -> dict:
    """In-context accuracy / F1 of a causal LM per ``config.incontext`` over ``config.data``.

    Returns ``summary`` (mean and std over draws, raw and calibrated) and one row per draw
    with its demonstrations (decoded), metrics and content-free label probabilities.
    """
    icl = config.incontext
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = int(pad or 0)
    evaluator, rows = None, []
    for draw in range(icl.draws if icl.k else 1):
        ep = build_episode(config.data, tokenizer, icl, draw)
        if evaluator is None:
            evaluator = Evaluator(graphdef, mesh, kind="lm", num_labels=len(ep.label_names),
                                  label_names=ep.label_names, choices=True,
                                  loss_chunk=config.train.loss_chunk)
        longest = max(len(p) for p in ep.queries + ep.content_free) + max(len(o) for o in ep.options)
        length = -(-longest // 16) * 16

        def batches(prompts, labels):
            return choice_batches(prompts, labels, ep.options, icl.batch_size, length, pad)

        row: dict[str, Any] = {"draw": draw,
                               "demonstrations": [tokenizer.decode(d) for d in ep.demonstrations]}
        bias = None
        if icl.calibrate:
            neutral = np.zeros(len(ep.content_free), np.int32)
            scores = np.concatenate([evaluator.scores(params, rest, b)
                                     for b in batches(ep.content_free, neutral)])[:len(ep.content_free)]
            bias = calibration_bias(scores)
            row["p_content_free"] = np.exp(bias).tolist()
        row["metrics"] = evaluator.run(params, rest, batches(ep.queries, ep.labels), option_bias=bias)
        rows.append(row)
    summary = _mean_std([r["metrics"] for r in rows])
    if icl.calibrate:
        summary.update(_mean_std([r["metrics"]["calibrated"] for r in rows], "calibrated_"))
    return {"k": icl.k, "num_draws": len(rows), "num_examples": int(rows[0]["metrics"]["num_examples"]),
            "label_names": evaluator.label_names, "summary": summary, "draws": rows}


def format_summary(result: dict) -> str:
    """``accuracy 0.812 ± 0.021`` lines for the console."""
    s = result["summary"]
    lines = [f"in-context k={result['k']} per label, {result['num_draws']} draws, "
             f"{result['num_examples']} examples"]
    for prefix, title in (("", "raw"), ("calibrated_", "calibrated")):
        if f"{prefix}accuracy_mean" in s:
            lines.append(f"{title:>12s}  " + "  ".join(
                f"{m} {s[f'{prefix}{m}_mean']:.4f} ± {s[f'{prefix}{m}_std']:.4f}" for m in SUMMARY_METRICS))
    return "\n".join(lines)
