"""The jitted eval pass: per-batch sums and confusion matrices accumulated on device.

One step per batch adds to on-device sums; the host turns them into metrics once, at the end.
Kinds (``Evaluator(kind=...)``):

* ``lm``: loss, perplexity and bits per byte (UTF-8 bytes of the targets summed on device).
* ``lm`` with ``choices=True`` (text-to-text classification): every label's verbaliser is scored
  by its summed log-likelihood in one forward pass over ``[B*C, T]``; the best-scoring allowed
  label is the prediction and feeds the same confusion matrix as a classifier head.
* ``classification``: a classifier head's argmax.
* ``token``: the token-level confusion matrix, plus CoNLL entity P/R/F1 when the tags are
  BIO/IOBES; entity spans need the tag sequences, so predictions are gathered per batch
  (left on device until the end) and the spans are read on host once.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax import sharding
from ftjax.eval import entities as entities_lib
from ftjax.eval import metrics as metrics_lib
from ftjax.eval.byte_counts import token_byte_lengths
from ftjax.train import lm_loss
from ftjax.train.step import IGNORE, lm_loss_terms, loss_terms, model_inputs, restrict_to_task

KINDS = ("lm", "classification", "token")
_CHOICE_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask")


def choice_log_likelihoods(model: nnx.Module, batch: dict[str, jax.Array], chunk: int = 0
                           ) -> jax.Array:
    """Summed log-likelihood ``[B, C]`` of every option's target tokens (``choice_*`` ``[B, C, T]``);
    ``chunk`` > 0 scores ``chunk`` positions at a time (``lm_loss.row_sums``)."""
    b, c, t = batch["choice_input_ids"].shape
    flat = {k: batch[f"choice_{k}"].reshape(b * c, t) for k in _CHOICE_KEYS}
    weights = flat["loss_mask"].astype(jnp.float32)
    nll, _ = lm_loss.model_row_sums(model, model_inputs(flat), flat["targets"], weights, chunk)
    return -nll.reshape(b, c)


def _confusion(labels: jax.Array, preds: jax.Array, weights: jax.Array, n: int) -> jax.Array:
    return jnp.zeros((n, n), jnp.float32).at[
        jnp.clip(labels, 0, n - 1).ravel(), preds.ravel()].add(weights.ravel())


def _init_acc(kind: str, num_labels: int, choices: bool) -> dict[str, jax.Array]:
    acc = {"nll": jnp.zeros((), jnp.float32), "weight": jnp.zeros((), jnp.float32)}
    if kind in ("classification", "token") or choices:
        acc["confusion"] = jnp.zeros((num_labels, num_labels), jnp.float32)
    if kind == "lm" and not choices:
        acc["bytes"] = jnp.zeros((), jnp.float32)
    return acc


def _choice_update(acc: dict, ll: jax.Array, option_tokens: jax.Array, batch: dict[str, jax.Array],
                   num_labels: int, option_bias: jax.Array | None) -> dict:
    """``acc`` plus one batch's option log-likelihoods ``ll`` ``[B, C]`` (``option_tokens`` ``[B, C]``
    scored tokens each): the gold option's NLL and tokens, the confusion matrix of the best
    allowed option and, with ``option_bias``, that of ``ll - option_bias`` (``calibrated``)."""
    acc = dict(acc)
    w = batch["example_mask"].astype(jnp.float32)
    labels = jnp.clip(batch["labels"], 0, ll.shape[1] - 1)
    gold_tokens = jnp.take_along_axis(option_tokens, labels[:, None], 1)[:, 0]
    acc["nll"] += -jnp.sum(jnp.take_along_axis(ll, labels[:, None], 1)[:, 0] * w)
    acc["weight"] += jnp.sum(gold_tokens * w)
    allowed = batch["choice_mask"] > 0
    preds = jnp.argmax(jnp.where(allowed, ll, -jnp.inf), -1)
    acc["confusion"] += _confusion(batch["labels"], preds, w, num_labels)
    if option_bias is not None:
        preds = jnp.argmax(jnp.where(allowed, ll - option_bias, -jnp.inf), -1)
        acc["calibrated"] += _confusion(batch["labels"], preds, w, num_labels)
    return acc


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, kind: str, num_labels: int, *,
                   choices: bool = False, byte_lengths: np.ndarray | None = None,
                   gather_tags: bool = False, loss_chunk: int = 0):
    """``step(params, frozen, batch, acc, option_bias) -> (acc, tags)`` for one batch.

    With ``option_bias`` ``[C]`` (contextual calibration) a second confusion matrix,
    ``acc["calibrated"]``, counts the argmax of the choice log-likelihoods minus the bias, from
    the same forward pass. ``tags`` holds replicated token predictions, labels and mask when
    ``gather_tags``; otherwise it is empty. ``loss_chunk`` > 0: a causal LM's head and loss run
    over that many positions at a time (``lm_loss``).
    """
    replicated = NamedSharding(mesh, P())
    table = None if byte_lengths is None else jnp.asarray(byte_lengths, jnp.float32)

    def step(params, frozen, batch, acc, option_bias):
        model = nnx.merge(graphdef, params, frozen)
        w = batch["example_mask"].astype(jnp.float32)
        acc, tags = dict(acc), {}
        if choices:
            ll = choice_log_likelihoods(model, batch, loss_chunk)
            return _choice_update(acc, ll, batch["choice_loss_mask"].sum(-1), batch, num_labels,
                                  option_bias), tags
        if kind == "lm":
            total, weight, _ = lm_loss_terms(model, batch, loss_chunk)
        else:
            logits = restrict_to_task(model(**model_inputs(batch)), batch)
            total, weight, _ = loss_terms(logits, batch, kind)
        acc["nll"] += total
        acc["weight"] += weight
        if kind == "lm" and table is not None:
            lengths = jnp.take(table, batch["targets"], mode="fill", fill_value=0.0)
            acc["bytes"] += jnp.sum(lengths * batch["loss_mask"])
        if kind in ("classification", "token"):
            labels, preds = batch["labels"], jnp.argmax(logits, -1)
            if kind == "token":
                w = w[:, None] * ((labels != IGNORE) & (batch["segment_ids"] > 0))
            acc["confusion"] += _confusion(labels, preds, w, num_labels)
            if gather_tags:
                tags = jax.lax.with_sharding_constraint(
                    dict(pred=preds.astype(jnp.int32), true=labels, mask=w > 0), replicated)
        return acc, tags

    return step


class Evaluator:
    """Compiles the eval step once and runs full passes over a split."""

    def __init__(self, graphdef: nnx.GraphDef, mesh: Mesh, *, kind: str, num_labels: int = 0,
                 label_names: Sequence[str] | None = None, choices: bool = False,
                 tokenizer: Any = None, loss_chunk: int = 0):
        if kind not in KINDS:
            raise ValueError(f"eval kind {kind!r}; choose from {KINDS}")
        if choices and (kind != "lm" or not num_labels):
            raise ValueError("choices=True scores verbalisers with a causal LM: kind='lm' and num_labels > 0")
        self.mesh, self.kind, self.num_labels, self.choices = mesh, kind, num_labels, choices
        self.label_names = list(label_names) if label_names is not None else None
        self.entities = kind == "token" and entities_lib.is_entity_scheme(self.label_names or [])
        byte_lengths = (token_byte_lengths(tokenizer)
                        if kind == "lm" and not choices and tokenizer is not None else None)
        # The accumulators stay replicated in and out, so the second batch reuses the first
        # batch's program (an unplaced accumulator came back with another sharding: two compiles).
        self._replicated = NamedSharding(mesh, P())
        self._raw_step = make_eval_step(graphdef, mesh, kind, num_labels, choices=choices,
                                        byte_lengths=byte_lengths, gather_tags=self.entities,
                                        loss_chunk=loss_chunk)
        self._step = jax.jit(self._raw_step, out_shardings=self._replicated, donate_argnums=(3,))
        self._arm_steps: dict = {}  # run_arms' vmapped step, for the latest (frozen_of, num_arms)
        self._score = jax.jit(
            lambda params, frozen, batch: choice_log_likelihoods(nnx.merge(graphdef, params, frozen),
                                                                 batch, loss_chunk))
        self._update_choices = jax.jit(partial(_choice_update, num_labels=num_labels))

    @classmethod
    def for_experiment(cls, exp: Any) -> "Evaluator":
        """The evaluator of a built ``Experiment``: its kind, labels, tokenizer and task."""
        info = exp.pipe.info
        return cls(exp.graphdef, exp.mesh, kind=exp.kind, num_labels=info.num_labels,
                   label_names=info.label_names, tokenizer=exp.tokenizer,
                   choices=exp.kind == "lm" and info.task == "text_to_text",
                   loss_chunk=exp.config.train.loss_chunk)

    def scores(self, params: Any, frozen: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Per-option summed log-likelihoods ``[B, C]`` of one ``choice_*`` batch."""
        return np.asarray(jax.device_get(self._score(params, frozen, sharding.shard_batch(batch, self.mesh))))

    def run(self, params: Any, frozen: Any, batches: Iterable[dict[str, np.ndarray]],
            max_batches: int = 0, option_bias: np.ndarray | None = None) -> dict:
        """One pass over ``batches``; with ``option_bias`` [C] (choices only) the result also holds
        ``calibrated``: the metrics of the bias-corrected predictions (see make_eval_step)."""
        acc, bias = self._start(option_bias)
        acc, gathered = self._accumulate(
            lambda batch, acc: self._step(params, frozen, batch, acc, bias), acc, batches, max_batches)
        return self._metrics(jax.device_get(acc), jax.device_get(gathered))

    def run_scores(self, scores: np.ndarray, labels: np.ndarray, option_tokens: Sequence[int],
                   option_bias: np.ndarray | None = None) -> dict:
        """``run``'s metrics from option log-likelihoods scored elsewhere (choices only):
        ``scores`` ``[N, C]``, every option allowed; ``option_tokens`` ``[C]``: each option's
        scored tokens (for the loss)."""
        if not self.choices:
            raise ValueError("run_scores takes verbaliser scores: it needs choices=True")
        acc, bias = self._start(option_bias)
        scores = np.asarray(scores, np.float32)
        n = len(scores)
        batch = dict(labels=np.asarray(labels, np.int32), example_mask=np.ones(n, np.float32),
                     choice_mask=np.ones(scores.shape, np.float32))
        tokens = np.broadcast_to(np.asarray(option_tokens, np.float32), scores.shape)
        acc = self._update_choices(acc, scores, tokens, batch, option_bias=bias)
        return self._metrics(jax.device_get(acc), [])

    def run_arms(self, params: Any, shared: Any, per_arm: Any, frozen_of: Callable[[Any, Any], Any],
                 batches: Iterable[dict[str, np.ndarray]], num_arms: int, max_batches: int = 0
                 ) -> list[dict]:
        """One pass for ``num_arms`` arms at once (fused sweep arms): ``params`` and ``per_arm``
        carry a leading arm axis, ``shared`` does not, ``frozen_of(shared, per_arm)`` is one arm's
        frozen state. The step is ``vmap``-ped over the arms, so a frozen backbone they share runs
        once per batch. Returns each arm's ``run`` metrics."""
        key = (frozen_of, num_arms)
        if key not in self._arm_steps:
            step = self._raw_step
            self._arm_steps = {key: jax.jit(jax.vmap(
                lambda p, sh, pa, batch, acc: step(p, frozen_of(sh, pa), batch, acc, None),
                in_axes=(0, None, 0, None, 0)), out_shardings=self._replicated, donate_argnums=(4,))}
        arm_step = self._arm_steps[key]
        acc = jax.device_put(jax.tree.map(lambda x: np.zeros((num_arms, *x.shape), x.dtype),
                                          _init_acc(self.kind, self.num_labels, self.choices)),
                             self._replicated)
        acc, gathered = self._accumulate(lambda batch, acc: arm_step(params, shared, per_arm, batch, acc),
                                         acc, batches, max_batches)
        acc, gathered = jax.device_get(acc), jax.device_get(gathered)
        return [self._metrics(jax.tree.map(lambda x: x[i], acc),
                              [jax.tree.map(lambda x: x[i], t) for t in gathered])
                for i in range(num_arms)]

    def _start(self, option_bias: np.ndarray | None) -> tuple[dict, jax.Array | None]:
        acc = _init_acc(self.kind, self.num_labels, self.choices)
        bias = None
        if option_bias is not None:
            if not self.choices:
                raise ValueError("option_bias calibrates verbaliser scores: it needs choices=True")
            bias = jax.device_put(jnp.asarray(option_bias, jnp.float32), self._replicated)
            acc["calibrated"] = jnp.zeros_like(acc["confusion"])
        return jax.device_put(acc, self._replicated), bias

    def _accumulate(self, step: Callable, acc: dict, batches: Iterable[dict[str, np.ndarray]],
                    max_batches: int) -> tuple[dict, list]:
        gathered = []
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            acc, tags = step(sharding.shard_batch(batch, self.mesh), acc)
            if tags:
                gathered.append(tags)
        return acc, gathered

    def _metrics(self, host: dict, gathered: list) -> dict:
        """Metrics from the host copy of the accumulators (and the gathered tags)."""
        loss = metrics_lib.lm_metrics(float(host["nll"]), float(host["weight"]),
                                      float(host.get("bytes", 0.0)) or None)
        if "confusion" not in host:
            return loss
        out = metrics_lib.classification_metrics(host["confusion"], self.label_names)
        out["loss"] = loss["loss"]
        if self.choices:
            out["perplexity"] = loss["perplexity"]
        if "calibrated" in host:
            out["calibrated"] = metrics_lib.classification_metrics(host["calibrated"], self.label_names)
        if self.entities:
            out.update(self._entity_metrics(gathered))
        return out

    def _entity_metrics(self, gathered: list[dict[str, np.ndarray]]) -> dict:
        names = self.label_names
        true, pred = [], []
        for tags in gathered:
            for t, p, m in zip(tags["true"], tags["pred"], tags["mask"]):
                if m.any():
                    true.append([names[i] for i in t[m]])
                    pred.append([names[i] for i in p[m]])
        return entities_lib.entity_metrics(true, pred)
