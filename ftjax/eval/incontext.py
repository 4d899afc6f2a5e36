"""In-context few-shot evaluation: k demonstrations per label in the prompt, labels scored by
log-likelihood.

This is the baseline k-shot fine-tuning is compared against, so every piece is shared with it:
draw ``d``'s demonstrations are exactly the train split that ``config.data.kshot`` (k, seed,
draw=d) gives a fine-tuning run, each encoded as text_to_text trains on it (prompt template +
verbaliser + EOS); the queries and label options are text_to_text's eval prompts and
verbalisers. Scoring: on a decoder with a KV cache the draw's demonstrations are encoded once and
every query and content-free prompt runs on top of them (``prefix_scores``; config
``incontext.prefix_cache``, on by default); otherwise (an encoder, prompt tuning, k = 0 or the
switch off) the Evaluator's verbaliser path scores each prompt's full sequence (all options of a
batch in one jitted call). Both give the same scores up to float rounding. Contextual
calibration (Zhao et al., 2021) divides p(label | demos, x) by the mean p(label | demos,
content-free x), i.e. subtracts log p_cf from the options' log-likelihoods.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from scipy.special import log_softmax, logsumexp

from ftjax.data import encode, packing, prepare
from ftjax.data.records import DataError, Record
from ftjax.eval import prefix_scores
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


class _Progress:
    """``in-context draw 2/5: 96/201 prompts, 3.10/s`` every ``every_s`` seconds and at a draw's end."""

    def __init__(self, draws: int, every_s: float = 30.0):
        self.draws, self.every_s = draws, every_s

    def start(self, draw: int, total: int) -> None:
        self.draw, self.total, self.offset, self.done = draw, total, 0, 0
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        """``n`` prompts of the current scoring call are done."""
        self.done = self.offset + n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            print(f"in-context draw {self.draw + 1}/{self.draws}: {self.done}/{self.total} prompts, "
                  f"{self.done / max(now - self.t0, 1e-9):.2f}/s", flush=True)

    def next_call(self) -> None:
        self.offset = self.done


def _full_scores(evaluator: Evaluator, params: Any, rest: Any, prompts: list[np.ndarray],
                 options: list[list[int]], batch_size: int, length: int, pad: int,
                 on_batch: Callable[[int], None]) -> np.ndarray:
    """``[N, C]`` option log-likelihoods, every prompt's whole sequence in the forward pass."""
    out = []
    for b in choice_batches(prompts, np.zeros(len(prompts), np.int32), options, batch_size, length, pad):
        out.append(evaluator.scores(params, rest, b))
        on_batch(min(len(out) * batch_size, len(prompts)))
    return np.concatenate(out)[:len(prompts)]


def evaluate_incontext(model: nnx.Module, tokenizer: Any, config: ml_collections.ConfigDict,
                       mesh: Mesh) -> dict:
    """In-context accuracy / F1 of a causal LM per ``config.incontext`` over ``config.data``.

    With ``incontext.prefix_cache`` (and k > 0 and a decoder with a KV cache,
    ``prefix_scores.supported``) each draw's demonstrations are encoded once and every query and
    content-free prompt runs on top of them; otherwise every prompt's full sequence is scored.
    Returns ``summary`` (mean and std over draws, raw and calibrated), ``prefix_cache`` (the path
    taken) and one row per draw with its demonstrations (decoded), metrics and content-free label
    probabilities.
    """
    icl = config.incontext
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = int(pad or 0)
    episodes = [build_episode(config.data, tokenizer, icl, d) for d in range(icl.draws if icl.k else 1)]
    cached = bool(icl.prefix_cache) and icl.k > 0 and prefix_scores.supported(model)
    evaluator = Evaluator(graphdef, mesh, kind="lm", num_labels=len(episodes[0].label_names),
                          label_names=episodes[0].label_names, choices=True,
                          loss_chunk=config.train.loss_chunk)
    if cached:
        scorer = prefix_scores.PrefixScorer(graphdef, mesh, icl.batch_size, pad)
        slots = max(prefix_scores.prefix_slots(len(ep.context)) for ep in episodes)
    progress, rows = _Progress(len(episodes)), []
    for ep in episodes:
        if cached:
            context = scorer.encode(params, rest, ep.context, slots)

            def score(seqs, ep=ep, context=context):
                prompts = [s[len(ep.context):] for s in seqs]
                return scorer.scores(params, rest, context, prompts, ep.options, progress.update)
        else:
            longest = max(len(p) for p in ep.queries + ep.content_free) + max(len(o) for o in ep.options)

            def score(seqs, ep=ep, length=-(-longest // 16) * 16):
                return _full_scores(evaluator, params, rest, seqs, ep.options, icl.batch_size, length,
                                    pad, progress.update)

        progress.start(ep.draw, len(ep.queries) + (len(ep.content_free) if icl.calibrate else 0))
        row: dict[str, Any] = {"draw": ep.draw,
                               "demonstrations": [tokenizer.decode(d) for d in ep.demonstrations]}
        bias = None
        if icl.calibrate:
            bias = calibration_bias(score(ep.content_free))
            row["p_content_free"] = np.exp(bias).tolist()
            progress.next_call()
        row["metrics"] = evaluator.run_scores(score(ep.queries), ep.labels,
                                              [len(o) for o in ep.options], option_bias=bias)
        rows.append(row)
    summary = _mean_std([r["metrics"] for r in rows])
    if icl.calibrate:
        summary.update(_mean_std([r["metrics"]["calibrated"] for r in rows], "calibrated_"))
    return {"k": icl.k, "num_draws": len(rows), "num_examples": int(rows[0]["metrics"]["num_examples"]),
            "label_names": evaluator.label_names, "prefix_cache": cached, "summary": summary,
            "draws": rows}


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
