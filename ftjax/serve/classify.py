"""Jitted sequence classification for ``/v1/classify``: label probabilities per input text."""

from __future__ import annotations

import threading
from functools import partial
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from ftjax.generate.generator import bucket


@partial(jax.jit, static_argnames="graphdef")
def _probabilities(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array,
                   mask: jax.Array) -> jax.Array:
    return jax.nn.softmax(nnx.merge(graphdef, state)(ids, mask).astype(np.float32), axis=-1)


class Classifier:
    """A ``heads.SequenceClassifier`` with its tokenizer and label names; bucketed shapes."""

    def __init__(self, model: nnx.Module, tokenizer: Any, labels: Sequence[str], *,
                 max_len: int, max_batch: int = 8):
        self.tokenizer, self.labels = tokenizer, list(labels)
        self.graphdef, self.state = nnx.split(model)
        self.max_len, self.max_batch = max_len, max_batch
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text)["input_ids"])
        if len(ids) > self.max_len:
            raise ValueError(f"input has {len(ids)} tokens; the context is {self.max_len}")
        return ids

    def classify(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """``{label: probability}`` for each text (tokenised and checked first)."""
        encoded = [self.encode(t) for t in texts]
        out: list[dict[str, float]] = []
        for i in range(0, len(encoded), self.max_batch):
            chunk = encoded[i:i + self.max_batch]
            b, t = bucket(len(chunk), 1), min(bucket(max(map(len, chunk)), 16), self.max_len)
            ids, mask = np.full((b, t), self.pad_id, np.int32), np.zeros((b, t), np.int32)
            for row, seq in enumerate(chunk):  # right padding; the head pools the last token
                ids[row, :len(seq)], mask[row, :len(seq)] = seq, 1
            with self._lock:
                probs = np.asarray(_probabilities(self.graphdef, self.state, ids, mask))
            out += [dict(zip(self.labels, map(float, p))) for p in probs[:len(chunk)]]
        return out
