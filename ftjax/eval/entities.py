"""Entity-level precision / recall / F1 in the CoNLL-2000 ``conlleval`` convention.

Chunks are read from BIO / IOB1 / IOBES tags the way ``conlleval`` (and ``seqeval``'s default
mode) reads them: an ``I-X`` after ``O`` or after another type opens a chunk, a change of type
closes one. An entity counts as correct only when its type, start and end all match.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Entity = tuple[str, int, int]  # (type, first token, last token)

# (previous tag, tag) prefixes that close / open a chunk regardless of the types.
_ENDS = {("E", t) for t in "BIESO"} | {("S", t) for t in "BIESO"} | {
    (p, t) for p in "BI" for t in "BSO"}
_STARTS = {("O", "E"), ("O", "I"), ("E", "E"), ("E", "I"), ("S", "E"), ("S", "I")} | {
    (p, t) for p in "BIESO" for t in "BS"}


def _split(tag: str) -> tuple[str, str]:
    """``B-PER`` -> ("B", "PER"); ``O`` -> ("O", ""); a bare ``PER`` reads as ("I", "PER")."""
    if tag == "O":
        return "O", ""
    if tag[1:2] == "-" and tag[0] in "BIES":
        return tag[0], tag[2:]
    return "I", tag


def entities(tags: Sequence[str]) -> list[Entity]:
    """The chunks of one sentence's tag sequence."""
    out: list[Entity] = []
    prev, prev_kind, start = "O", "", 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, kind = _split(tag)
        if (prev, prefix) in _ENDS or (prev != "O" and prev_kind != kind):
            out.append((prev_kind, start, i - 1))
        if (prev, prefix) in _STARTS or (prefix != "O" and prev_kind != kind):
            start = i
        prev, prev_kind = prefix, kind
    return out


def _prf(tp: float, predicted: float, true: float) -> tuple[float, float, float]:
    p = tp / predicted if predicted else 0.0
    r = tp / true if true else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def entity_metrics(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict:
    """Micro / macro / weighted entity P/R/F1 and per-type rows over a list of sentences."""
    if len(true_tags) != len(pred_tags):
        raise ValueError(f"{len(true_tags)} true sentences but {len(pred_tags)} predicted")
    counts: dict[str, np.ndarray] = {}  # type -> [tp, predicted, true]
    for t, p in zip(true_tags, pred_tags):
        if len(t) != len(p):
            raise ValueError(f"sentence with {len(t)} true tags but {len(p)} predicted")
        gold, guess = set(entities(t)), set(entities(p))
        for e in gold | guess:
            c = counts.setdefault(e[0], np.zeros(3))
            c += (e in gold and e in guess, e in guess, e in gold)
    kinds = sorted(counts)
    rows = [dict(zip(("precision", "recall", "f1"), _prf(*counts[k])), label=k,
                 support=int(counts[k][2])) for k in kinds]
    total = sum(counts.values()) if counts else np.zeros(3)
    micro = _prf(*total)
    support = np.array([r["support"] for r in rows], np.float64)
    weights = support / support.sum() if support.sum() else np.zeros(len(rows))
    out = {"entity_num_true": int(total[2]), "entity_num_predicted": int(total[1])}
    for i, name in enumerate(("precision", "recall", "f1")):
        values = np.array([r[name] for r in rows], np.float64)
        out[f"entity_{name}_micro"] = float(micro[i])
        out[f"entity_{name}_macro"] = float(values.mean()) if rows else 0.0
        out[f"entity_{name}_weighted"] = float((values * weights).sum())
    out["entity_per_type"] = [{"label": r["label"], "precision": float(r["precision"]),
                               "recall": float(r["recall"]), "f1": float(r["f1"]),
                               "support": r["support"]} for r in rows]
    return out


def is_entity_scheme(label_names: Sequence[str]) -> bool:
    """True when the tag set looks like BIO / IOBES (so entity metrics mean something)."""
    return any(name[:2] in ("B-", "I-", "E-", "S-") for name in label_names)
