"""Does a causal LM reproduce the personal data that ``data.privacy`` took out of its text?

Each value in the private originals file (``config.data.privacy.originals_path``) is a probe:
the text before it is the prompt, and the model's greedy continuation (as many tokens as the
value has, plus a few) *reproduces* it when the value's letters and digits, lower-cased, occur
in the continuation's (so ``07700 900123`` counts as ``07700-900123``). A model fine-tuned on
redacted text should reproduce none beyond chance; the same model fine-tuned on the raw text is
the comparison that shows the check can see memorisation. Prompts are the plain field text, not
a task's template. Results name rows by ``where`` and ``value_hmac``, never the value.
"""

from __future__ import annotations

import collections
import json
import os

from ftjax.errors import FtjaxError
from ftjax.generate import Generator, Request, SamplingParams

EXTRA_TOKENS = 4  # generated beyond the value's own token count


class LeakageError(FtjaxError, ValueError):
    """A missing or malformed originals file."""


def load_probes(path: str | os.PathLike, split: str = "train", limit: int = 0) -> list[dict]:
    """The originals file's rows of ``split`` (the first ``limit``; 0 = all)."""
    if not os.path.isfile(path):
        raise LeakageError(f"{path}: no originals file; prepare the data with "
                           f"config.data.privacy.originals_path={str(path)!r} first")
    probes = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            row = json.loads(line)
            if not {"value", "prefix", "entity", "split"} <= row.keys():
                raise LeakageError(f"{path}:{n}: not a data.privacy originals line (needs value, "
                                   f"prefix, entity, split)")
            if row["split"] == split:
                probes.append(row)
    return probes[:limit] if limit else probes


def _alnum(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def reproduces(value: str, continuation: str) -> bool:
    """Whether ``continuation`` contains ``value`` up to case, spaces and punctuation."""
    key = _alnum(value)
    return bool(key) and key in _alnum(continuation)


def check(generator: Generator, probes: list[dict]) -> dict:
    """Greedy-continue every probe's prefix; counts per entity type and the reproduced rows."""
    tok = generator.tokenizer
    requests, kept, skipped = [], [], 0
    for p in probes:
        new = len(tok(p["value"], add_special_tokens=False)["input_ids"]) + EXTRA_TOKENS
        # without its trailing space: BPE vocabularies attach the space to the next word
        prefix = p["prefix"].rstrip()
        prompt = generator.encode(prefix) if prefix else []
        prompt = prompt[-(generator.max_len - new):]
        if not prompt:  # the value opens its field: no text to prompt with
            skipped += 1
            continue
        requests.append(Request(prompt, SamplingParams(max_new_tokens=new)))
        kept.append(p)
    outputs = generator.generate(requests) if requests else []
    by_entity: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    leaked = []
    for p, out in zip(kept, outputs):
        hit = reproduces(p["value"], out.text)
        by_entity[p["entity"]]["probes"] += 1
        by_entity[p["entity"]]["reproduced"] += hit
        if hit:
            leaked.append({k: p.get(k) for k in ("where", "field", "entity", "value_hmac")})
    return {"probes": len(kept), "reproduced": len(leaked), "skipped_no_prefix": skipped,
            "by_entity": {e: dict(c) for e, c in sorted(by_entity.items())}, "reproduced_rows": leaked}
