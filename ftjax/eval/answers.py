"""Exact match and token-level F1 of generated answers, with SQuAD's answer normalisation.

Independent of how the answers were generated: they take strings. Each prediction may have
several references; the best-matching one counts (SQuAD v1.1 evaluation).
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    guess = normalize_answer(prediction)
    return float(any(guess == normalize_answer(r) for r in references))


def _f1(prediction: str, reference: str) -> float:
    guess, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not guess or not gold:
        return float(guess == gold)
    common = sum((collections.Counter(guess) & collections.Counter(gold)).values())
    if not common:
        return 0.0
    p, r = common / len(guess), common / len(gold)
    return 2 * p * r / (p + r)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Bag-of-tokens F1 against the best reference."""
    return max(_f1(prediction, r) for r in references)


def answer_metrics(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict:
    """Mean exact match and token F1 over a set of generated answers."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference sets")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    n = len(predictions)
    em = sum(exact_match(p, r) for p, r in zip(predictions, refs))
    f1 = sum(token_f1(p, r) for p, r in zip(predictions, refs))
    return {"exact_match": em / n if n else 0.0, "token_f1": f1 / n if n else 0.0, "num_examples": n}
