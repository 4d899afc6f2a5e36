"""The input pipeline the trainer uses: ``build(config.data, tokenizer)`` -> ``Pipeline``.

Training batches come from an infinite, seeded stream over rows; its position (``get_state``) is
a small JSON dict saved with the checkpoint, and ``set_state`` resumes the exact stream. Each
process builds the same global batch plan and materialises only its own slice of rows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import ml_collections
import numpy as np

from ftjax.data import encode, mixture, packing, prepare
from ftjax.data.records import DataError


@dataclasses.dataclass
class DataInfo:
    task: str
    num_labels: int
    label_names: list[str]
    num_tasks: int
    task_names: list[str]
    pad_id: int
    label_offsets: list[int]  # task t owns label ids label_offsets[t]:label_offsets[t + 1]


def task_configs(cfg: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """One data config per task: the section itself, or the section with each task's overrides."""
    if not cfg.mixture.tasks:
        return {cfg.task: cfg}
    out = {}
    for name, overrides in cfg.mixture.tasks.items():
        sub = ml_collections.ConfigDict(cfg.to_dict())
        sub.mixture.tasks = ml_collections.ConfigDict()
        sub.update_from_flattened_dict(_flatten(ml_collections.ConfigDict(overrides).to_dict()))
        if sub.task != cfg.task:
            raise DataError(f"config.data.mixture.tasks.{name}.task={sub.task!r}: every task of a mixture "
                            f"must have task={cfg.task!r}")
        out[name] = sub
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Pipeline:
    """Prepared rows of every split plus the batch makers; see the module docstring."""

    def __init__(self, cfg: ml_collections.ConfigDict, tokenizer, prepared: dict[str, prepare.Prepared], *,
                 process_index: int, process_count: int, seed: int):
        self.cfg = cfg
        self._tokenizer = tokenizer
        self._prepared = prepared
        self._proc = (process_index, process_count)
        self._seed = seed
        self._lm = cfg.task in encode.LM_TASKS
        self.buckets = sorted(int(b) for b in cfg.buckets) or packing.default_buckets(cfg.seq_len)
        if self.buckets[-1] != cfg.seq_len:
            raise DataError(f"config.data.buckets={list(cfg.buckets)}: the largest bucket must equal "
                            f"seq_len={cfg.seq_len}")
        names = list(prepared)
        self._offsets = np.cumsum([0] + [len(p.labels) for p in prepared.values()])
        label_names = [f"{n}:{x}" if len(names) > 1 else x for n, p in prepared.items() for x in p.label_names]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.info = DataInfo(task=cfg.task, num_labels=len(label_names), label_names=label_names,
                             num_tasks=len(names), task_names=names, pad_id=int(pad or 0),
                             label_offsets=[int(o) for o in self._offsets])
        self.report = {n: p.report for n, p in prepared.items()} if len(names) > 1 else prepared[names[0]].report
        self._rows = {split: self._split_rows(split) for split in ("train", "eval")
                      if all(split in p.examples for p in prepared.values())}
        self._weights = mixture.weights([len(p.examples["train"]) for p in prepared.values()], cfg.mixture, names)

    @property
    def has_eval(self) -> bool:
        return "eval" in self._rows

    def _split_rows(self, split: str) -> list[packing.Rows]:
        """Rows per task; eval rows of text_to_text stay unpacked so each carries its label."""
        pack = self._lm and self.cfg.packing and not (split == "eval" and self.cfg.task == "text_to_text")
        out = []
        for t, p in enumerate(self._prepared.values()):
            rows = packing.to_rows(p.examples[split], seq_len=self.cfg.seq_len, lm=self._lm, pack=pack, task_id=t)
            if "labels" in rows.scalars:
                rows.scalars["labels"] = np.where(rows.scalars["labels"] >= 0,
                                                  rows.scalars["labels"] + self._offsets[t], -1).astype(np.int32)
            if len(rows) == 0:
                raise DataError(f"task {list(self._prepared)[t]!r}, split {split!r}: no examples left after "
                                f"preparation; see the data report")
            out.append(rows)
        return out

    def _keys(self, split: str) -> tuple[str, ...]:
        keys = ["task_id"] if self.info.num_tasks > 1 else []
        if self.cfg.task in ("classification", "pair_classification") or (
                self.cfg.task == "text_to_text" and split == "eval"):
            keys.append("labels")
        return tuple(keys)

    def _local(self, global_rows: int) -> slice:
        index, count = self._proc
        if global_rows % count:
            raise DataError(f"batch size {global_rows} does not divide over {count} processes")
        per = global_rows // count
        return slice(index * per, (index + 1) * per)

    # ------------------------------------------------------------------------- train

    def train_iterator(self, batch_size: int) -> "TrainIterator":
        return TrainIterator(self, batch_size)

    def _train_batch(self, picks: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        """``picks`` = the global batch as (task, row); returns this process's slice."""
        rows = self._rows["train"]
        longest = max(len(rows[t].tokens["input_ids"][r]) for t, r in picks)
        length = packing.bucket_for(longest, self.buckets)
        local = picks[self._local(len(picks))]
        parts = [packing.make_batch(rows[t], np.asarray([r]), length, self.info.pad_id, self._keys("train"))
                 for t, r in local]
        return self._with_label_mask({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})

    def _with_label_mask(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Multi-task classification: ``label_mask [B, num_labels]`` is True on each row's own
        task's labels, so the shared head (sized to the union of labels) acts as one head per task."""
        if self.info.num_tasks > 1 and self.cfg.task in ("classification", "pair_classification"):
            task, label = batch["task_id"][:, None], np.arange(self.info.num_labels)[None]
            batch["label_mask"] = (label >= self._offsets[task]) & (label < self._offsets[task + 1])
        return batch

    # ------------------------------------------------------------------------- eval

    def eval_batches(self, batch_size: int, split: str = "eval") -> Iterator[dict[str, np.ndarray]]:
        """One pass in file order (tasks one after another); the last batch is padded with
        rows whose ``example_mask`` is 0. text_to_text batches also carry ``choice_*`` arrays:
        each row's prompt followed by every label's verbaliser, for log-likelihood scoring."""
        if split not in self._rows:
            raise DataError(f"no {split!r} split: set config.data.eval_path (or hf/tfds eval_split)")
        rows = packing.Rows.concat(self._rows[split])
        lengths = rows.lengths
        keys = self._keys(split)
        for start in range(0, len(rows), batch_size):
            index = np.arange(start, min(start + batch_size, len(rows)))
            length = packing.bucket_for(int(lengths[index].max()), self.buckets)
            index = np.concatenate([index, np.full(batch_size - len(index), -1)])[self._local(batch_size)]
            batch = packing.make_batch(rows, index, length, self.info.pad_id, keys)
            if self.cfg.task == "text_to_text":
                batch.update(self._choices(rows, index))
            yield self._with_label_mask(batch)

    def verbalizer_ids(self) -> list[list[int]]:
        """Token ids of every label's answer (``' ' + verbaliser + EOS``), in label-id order."""
        return [ids for p, c in zip(self._prepared.values(), task_configs(self.cfg).values())
                for ids in encode.verbalizer_ids(c, self._tokenizer, p.labels)]

    def _choices(self, rows: packing.Rows, index: np.ndarray) -> dict[str, np.ndarray]:
        prompts = [rows.tokens["input_ids"][r][:rows.scalars["prompt_len"][r]] if r >= 0 else np.zeros(1, np.int32)
                   for r in index]
        allowed = np.zeros((len(index), self.info.num_labels), np.float32)
        for i, r in enumerate(index):
            if r >= 0:
                task = rows.scalars["task_id"][r]
                allowed[i, self._offsets[task]:self._offsets[task + 1]] = 1.0
        return packing.choice_arrays(prompts, self.verbalizer_ids(), allowed, self.buckets, self.info.pad_id)


class TrainIterator:
    """Infinite seeded stream of global batches; each process yields its own rows.

    Batch ``n`` draws each row's task with ``rng(seed, n)`` by the mixture weights; within a task
    the rows follow a fresh permutation per epoch, ``rng(seed, task, epoch)``. The state is the
    step and each task's draw count, so resuming replays nothing and skips nothing.
    """

    def __init__(self, pipe: Pipeline, batch_size: int):
        self._pipe = pipe
        self._batch_size = batch_size
        pipe._local(batch_size)  # fail early on a batch size that does not divide over processes
        self._sizes = [len(r) for r in pipe._rows["train"]]
        self._step = 0
        self._counts = [0] * len(self._sizes)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __iter__(self) -> "TrainIterator":
        return self

    def _row(self, task: int, k: int) -> int:
        epoch, i = divmod(k, self._sizes[task])
        key = (task, epoch)
        if key not in self._perms:
            self._perms = {kk: v for kk, v in self._perms.items() if kk[0] != task}
            self._perms[key] = np.random.default_rng([self._pipe._seed, task, epoch]).permutation(self._sizes[task])
        return int(self._perms[key][i])

    def __next__(self) -> dict[str, np.ndarray]:
        weights = self._pipe._weights
        if len(weights) == 1:
            tasks = np.zeros(self._batch_size, np.int64)
        else:
            tasks = np.random.default_rng([self._pipe._seed, 1 << 30, self._step]).choice(
                len(weights), size=self._batch_size, p=weights)
        picks = []
        for t in tasks:
            picks.append((int(t), self._row(int(t), self._counts[t])))
            self._counts[t] += 1
        self._step += 1
        return self._pipe._train_batch(picks)

    def get_state(self) -> dict:
        return {"step": self._step, "counts": list(self._counts), "batch_size": self._batch_size}

    def set_state(self, state: dict) -> None:
        if state.get("batch_size", self._batch_size) != self._batch_size:
            raise DataError(f"iterator state was saved with batch_size={state['batch_size']}, "
                            f"resuming with {self._batch_size}; keep config.train.batch_size when resuming")
        if len(state["counts"]) != len(self._counts):
            raise DataError(f"iterator state has {len(state['counts'])} tasks, the data config has "
                            f"{len(self._counts)}")
        self._step, self._counts = int(state["step"]), [int(c) for c in state["counts"]]


def load_tokenizer(cfg: ml_collections.ConfigDict, fallback: str = ""):
    """The configured HF fast tokenizer (a folder, hub id, or a .gguf via tokenizer_file)."""
    from transformers import AutoTokenizer
    source = cfg.tokenizer or fallback
    if not source:
        raise DataError("config.data.tokenizer is empty and no model tokenizer was given")
    local = Path(source).expanduser() / cfg.tokenizer_file if cfg.tokenizer_file else None
    if local is not None and local.suffix == ".gguf" and local.is_file():
        from ftjax.models.gguf_io import load_tokenizer as load_gguf_tokenizer  # cached rebuild
        return load_gguf_tokenizer(local)
    kwargs = {"gguf_file": cfg.tokenizer_file} if cfg.tokenizer_file else {}
    return AutoTokenizer.from_pretrained(source, **kwargs)


def build(data_cfg: ml_collections.ConfigDict, tokenizer, *, process_index: int = 0, process_count: int = 1,
          seed: int = 0) -> Pipeline:
    """Prepare (or load from the cache, ``prepare.cache_dir``) every task of ``config.data`` and
    return the pipeline."""
    directory = prepare.cache_dir(data_cfg)
    prepared = {name: prepare.prepare_cached(c, tokenizer, directory)[0]
                for name, c in task_configs(data_cfg).items()}
    return Pipeline(data_cfg, tokenizer, prepared, process_index=process_index,
                    process_count=process_count, seed=seed)
