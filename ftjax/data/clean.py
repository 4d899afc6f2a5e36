"""Cleaning steps over ``Record``s; every step counts what it changed and quarantines what it removed.

Order: normalise text (NFKC, control characters, whitespace, HTML, lower-case) -> drop empty ->
length filter -> exact duplicates -> near duplicates (MinHash). The train/eval leakage check
runs on the cleaned splits.
"""

from __future__ import annotations

import dataclasses
import html
import re
import unicodedata
import zlib

import numpy as np

from ftjax.data.records import Record

_SPACE = re.compile(r"\s+")


@dataclasses.dataclass
class SplitLog:
    """Rows after each step and every removed row with its reason."""
    steps: list[dict] = dataclasses.field(default_factory=list)
    quarantine: list[dict] = dataclasses.field(default_factory=list)

    def step(self, name: str, rows: int, **extra) -> None:
        self.steps.append({"step": name, "rows": rows, **extra})

    def remove(self, records: list[Record], keep: list[bool], name: str, reasons=None) -> list[Record]:
        """Keep ``records[i]`` where ``keep[i]``; quarantine the rest under ``name``."""
        out = []
        for i, (rec, k) in enumerate(zip(records, keep)):
            if k:
                out.append(rec)
            else:
                self.quarantine.append({"step": name, "where": rec.where,
                                        "reason": reasons[i] if reasons else name, "row": rec.to_json()})
        self.step(name, len(out), removed=len(records) - len(out))
        return out


def normalise(text: str, c) -> str:
    if c.html_unescape:
        text = html.unescape(text)
    if c.nfkc:
        text = unicodedata.normalize("NFKC", text)
    if c.control_chars:
        text = "".join(ch if ch in "\t\n" or unicodedata.category(ch)[0] != "C" else " " for ch in text)
    if c.whitespace:
        text = _SPACE.sub(" ", text).strip()
    if c.lowercase:
        text = text.lower()
    return text


def _normalise_record(rec: Record, c) -> bool:
    """Normalise ``rec`` in place; returns whether anything changed."""
    before = rec.key()
    rec.text = normalise(rec.text, c)
    rec.text_pair = normalise(rec.text_pair, c)
    if rec.messages:
        rec.messages = [{"role": m["role"], "content": normalise(m["content"], c)} for m in rec.messages]
    if rec.tokens:  # words keep their count so tags stay aligned; no whitespace collapsing inside
        rec.tokens = [normalise(t, c) or t for t in rec.tokens]
    return rec.key() != before


def text_of(rec: Record) -> str:
    """The text a row is judged by for emptiness, length, duplicates and leakage."""
    if rec.messages:
        return "\n".join(m["content"] for m in rec.messages)
    return rec.text + ("\n" + rec.text_pair if rec.text_pair else "")


def clean_split(records: list[Record], c, log: SplitLog) -> list[Record]:
    if c.nfkc or c.control_chars or c.whitespace or c.html_unescape or c.lowercase:
        changed = sum(_normalise_record(r, c) for r in records)
        log.step("normalise", len(records), changed=changed)
    if c.drop_empty:
        records = log.remove(records, [bool(text_of(r).strip()) for r in records], "empty")
    if c.min_chars or c.max_chars:
        n = [len(text_of(r)) for r in records]
        keep = [(not c.min_chars or k >= c.min_chars) and (not c.max_chars or k <= c.max_chars) for k in n]
        why = [f"length {k} chars outside [{c.min_chars}, {c.max_chars or 'inf'}]" for k in n]
        records = log.remove(records, keep, "length", why)
    if c.dedup:
        first: dict[tuple, str] = {}
        keep, why = [], []
        for r in records:
            keep.append(r.key() not in first)
            why.append(f"exact duplicate of {first.get(r.key())}")
            first.setdefault(r.key(), r.where)
        records = log.remove(records, keep, "dedup", why)
    if c.near_dedup:
        dup = near_duplicates([text_of(r) for r in records], c.near_dedup_threshold)
        why = [f"near duplicate of {records[dup[i]].where}" if i in dup else "" for i in range(len(records))]
        records = log.remove(records, [i not in dup for i in range(len(records))], "near_dedup", why)
    return records


def leakage(train: list[Record], evaluation: list[Record]) -> list[int]:
    """Indices of eval rows whose text (case- and space-insensitive) also occurs in train."""
    def key(r):
        return _SPACE.sub(" ", text_of(r)).strip().lower()
    seen = {key(r) for r in train}
    return [i for i, r in enumerate(evaluation) if key(r) in seen]


# ----------------------------------------------------------------------------- MinHash

_PRIME = (1 << 31) - 1  # a*h stays below 2**62, inside uint64
_NUM_PERM, _BANDS = 128, 32


def _shingles(text: str, n: int = 3) -> set[int]:
    words = text.lower().split()
    grams = [" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))]
    return {zlib.crc32(g.encode("utf-8")) for g in grams}


def minhash(texts: list[str], seed: int = 0) -> np.ndarray:
    """``[len(texts), 128]`` MinHash signatures of word 3-gram shingles."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _PRIME, _NUM_PERM, dtype=np.uint64)
    b = rng.integers(0, _PRIME, _NUM_PERM, dtype=np.uint64)
    sig = np.empty((len(texts), _NUM_PERM), np.uint64)
    for i, t in enumerate(texts):
        h = np.fromiter(_shingles(t), np.uint64)[:, None] % np.uint64(_PRIME)
        sig[i] = ((a * h + b) % np.uint64(_PRIME)).min(axis=0)
    return sig


def near_duplicates(texts: list[str], threshold: float) -> dict[int, int]:
    """``{duplicate index: index of the earlier row it repeats}`` by LSH over MinHash bands."""
    sig = minhash(texts)
    rows = _NUM_PERM // _BANDS
    dup: dict[int, int] = {}
    for band in range(_BANDS):
        buckets: dict[bytes, int] = {}
        for i in range(len(texts)):
            if i in dup:
                continue
            key = sig[i, band * rows:(band + 1) * rows].tobytes()
            j = buckets.setdefault(key, i)
            if j != i and np.mean(sig[i] == sig[j]) >= threshold:
                dup[i] = j
    return dup
