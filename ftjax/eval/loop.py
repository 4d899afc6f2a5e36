"""The jitted eval pass: per-batch sums and confusion matrices accumulated on device.

Nothing leaves the device until the whole split has been seen; the host then turns the sums
into metrics once.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ftjax import sharding
from ftjax.eval import metrics as metrics_lib
from ftjax.train.step import IGNORE, loss_terms, model_inputs


def _init_acc(kind: str, num_labels: int) -> dict[str, jax.Array]:
    acc = {"nll": jnp.zeros((), jnp.float32), "weight": jnp.zeros((), jnp.float32)}
    if kind in ("classification", "token"):
        acc["confusion"] = jnp.zeros((num_labels, num_labels), jnp.float32)
    return acc


def make_eval_step(graphdef: nnx.GraphDef, kind: str, num_labels: int):
    """``step(params, frozen, batch, acc) -> acc`` adding one batch's sums to ``acc``."""

    def step(params, frozen, batch, acc):
        model = nnx.merge(graphdef, params, frozen)
        logits = model(**model_inputs(batch))
        total, weight, _ = loss_terms(logits, batch, kind)
        acc = dict(acc, nll=acc["nll"] + total, weight=acc["weight"] + weight)
        if kind in ("classification", "token"):
            labels = batch["labels"]
            w = batch["example_mask"].astype(jnp.float32)
            if kind == "token":
                w = w[:, None] * ((labels != IGNORE) & (batch["segment_ids"] > 0))
            preds = jnp.argmax(logits, -1)
            cm = jnp.zeros((num_labels, num_labels), jnp.float32).at[
                jnp.clip(labels, 0, num_labels - 1).ravel(), preds.ravel()].add(w.ravel())
            acc["confusion"] = acc["confusion"] + cm
        return acc

    return step


class Evaluator:
    """Compiles the eval step once and runs full passes over a split."""

    def __init__(self, graphdef: nnx.GraphDef, mesh: Mesh, *, kind: str, num_labels: int = 0,
                 label_names: Sequence[str] | None = None):
        self.mesh, self.kind, self.num_labels = mesh, kind, num_labels
        self.label_names = label_names
        self._step = jax.jit(make_eval_step(graphdef, kind, num_labels), donate_argnums=(3,))

    def run(self, params: Any, frozen: Any, batches: Iterable[dict[str, np.ndarray]],
            max_batches: int = 0) -> dict:
        acc = _init_acc(self.kind, self.num_labels)
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            acc = self._step(params, frozen, sharding.shard_batch(batch, self.mesh), acc)
        host = jax.device_get(acc)
        loss = metrics_lib.lm_metrics(float(host["nll"]), float(host["weight"]))
        if self.kind == "lm":
            return loss
        out = metrics_lib.classification_metrics(host["confusion"], self.label_names)
        out["loss"] = loss["loss"]
        return out
