"""Examples -> rows (packed or one example per row) -> fixed-shape batches padded to a bucket.

A packed row holds several examples back to back; ``segment_ids`` (1, 2, 3, ...; 0 = padding)
and per-segment ``positions`` let attention stay inside each example, and ``targets`` /
``loss_mask`` never cross a segment boundary, so packed and unpacked give the same
per-example loss.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ftjax.data.encode import IGNORE, Example

TOKEN_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask", "labels")


@dataclasses.dataclass
class Rows:
    """Ragged rows: per-row token arrays (``TOKEN_KEYS`` that apply) and per-row scalars."""
    tokens: dict[str, list[np.ndarray]]
    scalars: dict[str, np.ndarray]  # labels, task_id, prompt_len: one value per row

    def __len__(self) -> int:
        return len(self.tokens["input_ids"])

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(r) for r in self.tokens["input_ids"]), np.int64, len(self))

    @staticmethod
    def concat(parts: list["Rows"]) -> "Rows":
        return Rows({k: [r for p in parts for r in p.tokens[k]] for k in parts[0].tokens},
                    {k: np.concatenate([p.scalars[k] for p in parts]) for k in parts[0].scalars})


def default_buckets(seq_len: int) -> list[int]:
    return sorted({max(8, seq_len // 4), max(8, seq_len // 2), seq_len})


def bucket_for(length: int, buckets: list[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"row of {length} tokens exceeds the largest bucket {buckets[-1]}")


def _lm_segment(ex: Example) -> tuple[np.ndarray, np.ndarray]:
    """Shifted targets and loss mask of one segment: position t predicts token t+1."""
    n = len(ex.ids)
    targets = np.zeros(n, np.int32)
    mask = np.zeros(n, np.float32)
    targets[:-1] = ex.ids[1:]
    mask[:-1] = ex.weights[1:]
    return targets, mask


def to_rows(examples: list[Example], *, seq_len: int, lm: bool, pack: bool, task_id: int = 0) -> Rows:
    """Group examples into rows: greedy in-order packing up to ``seq_len``, or one per row."""
    groups: list[list[Example]] = []
    used = seq_len + 1
    for ex in examples:
        if pack and used + len(ex.ids) <= seq_len:
            groups[-1].append(ex)
            used += len(ex.ids)
        else:
            groups.append([ex])
            used = len(ex.ids)
    tokens: dict[str, list[np.ndarray]] = {k: [] for k in ("input_ids", "segment_ids", "positions")}
    if lm:
        tokens.update(targets=[], loss_mask=[])
    if examples and examples[0].token_labels is not None:
        tokens["labels"] = []
    for group in groups:
        tokens["input_ids"].append(np.concatenate([e.ids for e in group]))
        tokens["segment_ids"].append(np.concatenate(
            [np.full(len(e.ids), s, np.int32) for s, e in enumerate(group, start=1)]))
        tokens["positions"].append(np.concatenate([np.arange(len(e.ids), dtype=np.int32) for e in group]))
        if lm:
            parts = [_lm_segment(e) for e in group]
            tokens["targets"].append(np.concatenate([p[0] for p in parts]))
            tokens["loss_mask"].append(np.concatenate([p[1] for p in parts]))
        if "labels" in tokens:
            tokens["labels"].append(np.concatenate([e.token_labels for e in group]))
    scalars = {"task_id": np.full(len(groups), task_id, np.int32)}
    if not pack:
        scalars["labels"] = np.asarray([e.label for e in examples], np.int32)
        scalars["prompt_len"] = np.asarray([e.prompt_len for e in examples], np.int32)
    return Rows(tokens, scalars)


def make_batch(rows: Rows, index: np.ndarray, length: int, pad_id: int,
               keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Rows ``index`` (-1 = an all-padding row with example_mask 0) as ``[len(index), length]``."""
    b = len(index)
    fill = {"input_ids": pad_id, "labels": IGNORE}
    out: dict[str, np.ndarray] = {}
    for k in TOKEN_KEYS:
        if k in rows.tokens:
            dtype = np.float32 if k == "loss_mask" else np.int32
            arr = np.full((b, length), fill.get(k, 0), dtype)
            for i, r in enumerate(index):
                if r >= 0:
                    row = rows.tokens[k][r]
                    arr[i, :len(row)] = row
            out[k] = arr
    real = index >= 0
    safe = np.where(real, index, 0)
    for k in keys:
        if k in rows.scalars and k not in out:
            out[k] = np.where(real, rows.scalars[k][safe], 0).astype(np.int32)
    out["example_mask"] = real.astype(np.float32)
    return out


def choice_arrays(prompts: list[np.ndarray], options: list[list[int]], allowed: np.ndarray,
                  buckets: list[int], pad_id: int) -> dict[str, np.ndarray]:
    """Every prompt followed by every option, ``[B, C, T]``, loss on the option's tokens only.

    ``allowed[b, c]`` = 1 where option ``c`` is a valid answer of row ``b`` (0 rows are padding).
    """
    length = bucket_for(max(len(p) for p in prompts) + max(len(o) for o in options), buckets)
    b, c = len(prompts), len(options)
    ids = np.full((b, c, length), pad_id, np.int32)
    targets = np.zeros((b, c, length), np.int32)
    mask = np.zeros((b, c, length), np.float32)
    seg = np.zeros((b, c, length), np.int32)
    for i, prompt in enumerate(prompts):
        for j, option in enumerate(options):
            seq = np.concatenate([prompt, option])
            n, p = len(seq), len(prompt)
            ids[i, j, :n], seg[i, j, :n] = seq, 1
            targets[i, j, :n - 1] = seq[1:]
            mask[i, j, p - 1:n - 1] = 1.0
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape) * (seg > 0)
    return {"choice_input_ids": ids, "choice_segment_ids": seg, "choice_positions": positions.astype(np.int32),
            "choice_targets": targets, "choice_loss_mask": mask,
            "choice_mask": np.asarray(allowed, np.float32)}
