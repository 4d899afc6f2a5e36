"""Episodes for meta-learning: a distribution of tasks, each episode one task with ``k`` support
and ``q`` query examples per label, disjoint.

Every task is one data config (``config.data`` with the task's overrides, as a mixture task is)
prepared by the data pipeline (cleaning, labels, tokenisation, cache); its train split is the
pool episodes draw from. Episode ``i`` picks its task uniformly and its examples without
replacement with ``rng(seed, i)``, so a run is reproducible and a resumed one needs no state.
Batches have one fixed shape per role (rows = examples per label x the most labels of any task,
``seq_len`` tokens; unused rows are masked), so one program serves every task. Classification
batches carry ``label_mask``: only the episode task's labels (ids ``0..C-1``) can win.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import ml_collections
import numpy as np

from ftjax.data import encode, packing, pipeline, prepare
from ftjax.data.config import data_config
from ftjax.data.records import DataError

# What every task shares with the study's own data config; the rest comes from the task.
SHARED_KEYS = ("task", "seq_len", "tokenizer", "tokenizer_file", "add_special_tokens", "truncation",
               "cache_dir", "clean")


@dataclasses.dataclass
class Task:
    name: str
    rows: packing.Rows  # one example per row
    labels: np.ndarray  # label id of each row
    label_names: list[str]


@dataclasses.dataclass(frozen=True)
class Episode:
    task: int  # index into the task list
    support: np.ndarray  # row indices, k per label, label by label
    query: np.ndarray  # row indices, q per label, none of them in support


def task_data_configs(data_cfg: ml_collections.ConfigDict, tasks: ml_collections.ConfigDict
                      ) -> dict[str, ml_collections.ConfigDict]:
    """One data config per meta-training task: the shared keys of ``data_cfg`` + the task's
    overrides (train split only, no k-shot subsampling)."""
    if not tasks:
        raise DataError("config.meta.tasks is empty: name at least one task (data overrides)")
    base = data_config()
    for key in SHARED_KEYS:
        base[key] = data_cfg[key]
    base.mixture.tasks = tasks
    configs = pipeline.task_configs(base)
    for name, c in configs.items():
        if not (c.train_path or c.hf.name or c.tfds.name):
            raise DataError(f"config.meta.tasks.{name}: no source; set its train_path (episodes "
                            f"come from the train split)")
    return configs


def load_tasks(data_cfg: ml_collections.ConfigDict, tasks: ml_collections.ConfigDict, tokenizer: Any
               ) -> list[Task]:
    """Prepare every task (the pipeline's cache applies) into one-example-per-row train rows."""
    if data_cfg.task not in ("classification", "text_to_text"):
        raise DataError(f"meta-learning episodes need config.data.task = classification or "
                        f"text_to_text, not {data_cfg.task!r}")
    out = []
    for name, cfg in task_data_configs(data_cfg, tasks).items():
        prepared, _ = prepare.prepare_cached(cfg, tokenizer, prepare.cache_dir(cfg))
        examples = prepared.examples["train"]
        rows = packing.to_rows(examples, seq_len=cfg.seq_len, lm=cfg.task in encode.LM_TASKS, pack=False)
        out.append(Task(name, rows, np.asarray([e.label for e in examples], np.int32),
                        list(prepared.label_names)))
    return out


def sample(tasks: Sequence[Task], k: int, q: int, seed: int, index: int) -> Episode:
    """Episode ``index``: a task drawn uniformly, then ``k + q`` rows per label without
    replacement (the first ``k`` support, the rest query)."""
    if k < 1 or q < 1:
        raise DataError(f"config.meta.k={k} and config.meta.queries={q} must both be >= 1")
    rng = np.random.default_rng([seed, index])
    t = int(rng.integers(len(tasks)))
    task = tasks[t]
    support, query = [], []
    for label, name in enumerate(task.label_names):
        pool = np.flatnonzero(task.labels == label)
        if len(pool) < k + q:
            raise DataError(f"meta task {task.name!r}: label {name!r} has {len(pool)} train rows, "
                            f"fewer than config.meta.k + config.meta.queries = {k + q}")
        chosen = rng.choice(pool, size=k + q, replace=False)
        support.append(chosen[:k])
        query.append(chosen[k:])
    return Episode(t, np.concatenate(support), np.concatenate(query))


class EpisodeBatcher:
    """Fixed-shape support/query batches of episodes, stacked ``[episodes, rows, seq_len]``."""

    def __init__(self, tasks: Sequence[Task], *, k: int, q: int, seed: int, seq_len: int, pad_id: int,
                 classification: bool, num_labels: int):
        self.tasks, self.k, self.q, self.seed = list(tasks), k, q, seed
        self.seq_len, self.pad_id, self.classification = seq_len, pad_id, classification
        self.num_labels = num_labels  # the model's head size (>= every task's label count)
        most = max(len(t.label_names) for t in self.tasks)
        if classification and most > num_labels:
            raise DataError(f"meta tasks have up to {most} labels, the model's head {num_labels}")
        self.most = most

    def episode_batch(self, episode: Episode, role: str) -> dict[str, np.ndarray]:
        """One episode's ``support`` or ``query`` batch."""
        task = self.tasks[episode.task]
        index = episode.support if role == "support" else episode.query
        per = self.k if role == "support" else self.q
        index = np.concatenate([index, np.full(per * self.most - len(index), -1)])
        keys = ("labels",) if self.classification else ()
        batch = packing.make_batch(task.rows, index, self.seq_len, self.pad_id, keys)
        if self.classification:
            own = np.arange(self.num_labels) < len(task.label_names)
            batch["label_mask"] = np.broadcast_to(own, (len(index), self.num_labels)).copy()
        return batch

    def batch(self, first: int, count: int) -> tuple[list[Episode], dict[str, dict[str, np.ndarray]]]:
        """Episodes ``first .. first+count-1`` and their stacked support and query batches."""
        episodes = [sample(self.tasks, self.k, self.q, self.seed, i) for i in range(first, first + count)]
        out = {}
        for role in ("support", "query"):
            parts = [self.episode_batch(e, role) for e in episodes]
            out[role] = {key: np.stack([p[key] for p in parts]) for key in parts[0]}
        return episodes, out
