"""``data.task = "preference"``: prompt / chosen / rejected rows as token pairs for DPO & co.

A row gives a prompt (``text_field``, text or chat messages; ``""`` = chosen and rejected are
whole conversations and the prompt is what they share) and two responses. Each pair becomes two
sequences ``prompt + response`` (chat: rendered with the tokenizer's chat template, the response
being what the template adds after the generation prompt) that always travel together: the
arrays are ``[pairs, 2, seq_len]`` with column 0 the chosen, column 1 the rejected sequence, and
the loss covers only the response tokens (``prompt_len <= t < length``).

Cleaning follows the other tasks' report: text normalised as ``config.data.clean`` says, exact
duplicate pairs removed (``clean.dedup``), and a pair whose response is empty or whose two
responses are identical is quarantined with that reason (never silently dropped), as is a pair
whose prompt leaves no room for a response within ``seq_len``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import ml_collections
import numpy as np

from ftjax.data import clean, sources
from ftjax.data.records import DataError, Record


@dataclasses.dataclass
class Pairs:
    """The encoded pairs of one split."""
    input_ids: np.ndarray  # [N, 2, L] int32, pad after each sequence
    prompt_len: np.ndarray  # [N, 2] tokens before the response
    length: np.ndarray  # [N, 2] tokens of prompt + response
    where: list[str]  # origin of each pair ("path:line")

    def __len__(self) -> int:
        return len(self.where)

    def subset(self, idx: np.ndarray) -> "Pairs":
        return Pairs(self.input_ids[idx], self.prompt_len[idx], self.length[idx],
                     [self.where[i] for i in idx])


def _normalise(rec: Record, c) -> bool:
    before = rec.key()
    rec.text = clean.normalise(rec.text, c)
    norm_msgs = lambda ms: [{"role": m["role"], "content": clean.normalise(m["content"], c)} for m in ms]
    if rec.messages:
        rec.messages = norm_msgs(rec.messages)
    rec.responses = [norm_msgs(r) if isinstance(r, list) else _normalise_response(r, c) for r in rec.responses]
    return rec.key() != before


def _normalise_response(text: str, c) -> str:
    """A text response keeps one leading space: it continues the prompt (" great" != "great")."""
    out = clean.normalise(text, c)
    return " " + out if out and text[:1].isspace() and not out[:1].isspace() else out


def _split_prompt(rec: Record) -> tuple[list[dict] | str, list]:
    """(prompt, [chosen, rejected]) with the shared prefix of two conversations as the prompt."""
    chosen, rejected = rec.responses
    if rec.messages or rec.text or not isinstance(chosen, list) or not isinstance(rejected, list):
        return (rec.messages or rec.text), [chosen, rejected]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], [chosen[n:], rejected[n:]]


def _response_text(response: str | list[dict]) -> str:
    return "".join(m["content"] for m in response) if isinstance(response, list) else response


def _pair_problem(rec: Record) -> str:
    """Why a pair cannot train ("" when it can)."""
    _, (chosen, rejected) = _split_prompt(rec)
    for name, r in (("chosen", chosen), ("rejected", rejected)):
        if not _response_text(r).strip():
            return f"empty {name} response"
    if chosen == rejected:
        return "chosen and rejected responses are identical"
    return ""


def _encode_one(cfg, tokenizer, prompt, response) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one sequence."""
    if isinstance(prompt, list) or isinstance(response, list):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"task=preference with chat messages needs a tokenizer with a chat template; "
                            f"{tokenizer.name_or_path!r} has none")
        prompt = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if cfg.system_prompt and (not prompt or prompt[0]["role"] != "system"):
            prompt.insert(0, {"role": "system", "content": cfg.system_prompt})
        response = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
        before = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
        if not full.startswith(before):
            raise DataError("the chat template does not render the conversation prefix by prefix, so the "
                            "response tokens cannot be located; use a standard template")
        return (tokenizer(before, add_special_tokens=False)["input_ids"],
                tokenizer(full[len(before):], add_special_tokens=False)["input_ids"])
    ids = tokenizer(prompt, add_special_tokens=cfg.add_special_tokens)["input_ids"] if prompt else []
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]  # a tokenizer that closes every text with EOS: the response follows the prompt
    if not ids and tokenizer.bos_token_id is not None and cfg.add_special_tokens:
        ids = [tokenizer.bos_token_id]
    resp = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        resp = resp + [tokenizer.eos_token_id]
    return ids, resp


def _encode(cfg, tokenizer, records: list[Record], pad_id: int) -> tuple[Pairs, list[tuple[int, str]], dict]:
    n, L = len(records), cfg.seq_len
    ids = np.full((n, 2, L), pad_id, np.int32)
    plen, length = np.zeros((n, 2), np.int32), np.zeros((n, 2), np.int32)
    drops, cut = [], 0
    keep = []
    for i, rec in enumerate(records):
        prompt, responses = _split_prompt(rec)
        seqs = [_encode_one(cfg, tokenizer, prompt, r) for r in responses]
        too_long = [len(p) + len(r) for p, r in seqs if len(p) + len(r) > L]
        if too_long and (cfg.truncation == "drop" or any(len(p) >= L for p, _ in seqs)):
            drops.append((i, f"{max(too_long)} tokens > seq_len={L} (prompt "
                             f"{max(len(p) for p, _ in seqs)} tokens)"))
            continue
        cut += bool(too_long)
        for j, (p, r) in enumerate(seqs):
            seq = (p + r)[:L]  # the prompt always fits; the response is cut at the end
            ids[i, j, :len(seq)] = seq
            plen[i, j], length[i, j] = len(p), len(seq)
        keep.append(i)
    k = np.asarray(keep, np.int64)
    pairs = Pairs(ids[k], plen[k], length[k], [records[i].where for i in keep])
    resp = (pairs.length - pairs.prompt_len).astype(np.float64)
    stats = {"prompt_tokens_mean": float(pairs.prompt_len.mean()) if len(k) else 0.0,
             "response_tokens_mean": float(resp.mean()) if len(k) else 0.0,
             "max_tokens": int(pairs.length.max()) if len(k) else 0, "truncated_pairs": cut}
    return pairs, drops, stats


def _dedup(records: list[Record], log: clean.SplitLog) -> list[Record]:
    first: dict[tuple, str] = {}
    keep, why = [], []
    for r in records:
        keep.append(r.key() not in first)
        why.append(f"exact duplicate of {first.get(r.key())}")
        first.setdefault(r.key(), r.where)
    return log.remove(records, keep, "dedup", why)


def prepare(cfg: ml_collections.ConfigDict, tokenizer: Any) -> tuple[dict[str, Pairs], dict, list[dict]]:
    """``({split: Pairs}, report, quarantine)`` for a ``task=preference`` data config."""
    if cfg.task != "preference":
        raise DataError(f"config.data.task={cfg.task!r}: preference data needs task='preference'")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    c = cfg.clean
    report: dict = {"task": "preference", "seq_len": cfg.seq_len, "splits": {}}
    out, quarantine = {}, []
    for split, origin in sources.split_names(cfg).items():
        log = clean.SplitLog()
        records = sources.read_split(cfg, split)
        if not records:
            raise DataError(f"{origin}: the {split} split has no rows (is the file empty?)")
        log.step("read", len(records))
        log.step("normalise", len(records), changed=sum(_normalise(r, c) for r in records))
        problems = [_pair_problem(r) for r in records]
        records = log.remove(records, [not p for p in problems], "pair", problems)
        if c.dedup:
            records = _dedup(records, log)
        if split == "train" and cfg.max_examples and len(records) > cfg.max_examples:
            records = records[:cfg.max_examples]
            log.step("max_examples", len(records))
        pairs, drops, stats = _encode(cfg, tokenizer, records, int(pad or 0))
        if drops:
            dropped = dict(drops)
            log.remove(records, [i not in dropped for i in range(len(records))], "tokenize",
                       [dropped.get(i, "") for i in range(len(records))])
        if not len(pairs):
            raise DataError(f"{origin}: every pair of the {split} split was removed; see the steps "
                            f"{log.steps} and the quarantine (first: {log.quarantine[:1]})")
        out[split] = pairs
        report["splits"][split] = {"source": origin, "steps": log.steps, "pairs": len(pairs), "tokens": stats}
        quarantine += [dict(split=split, **q) for q in log.quarantine]
    report["quarantined"] = len(quarantine)
    return out, report, quarantine


def batch_arrays(pairs: Pairs, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The step's inputs for the pairs ``idx``: ``input_ids [B, 2, L]``, ``prompt_len``, ``length``
    (and ``index``, the pairs' row numbers, for per-pair cached values)."""
    return dict(input_ids=pairs.input_ids[idx], prompt_len=pairs.prompt_len[idx], length=pairs.length[idx],
                index=np.asarray(idx))


def train_batches(pairs: Pairs, batch_size: int, seed: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """An endless stream of shuffled batches (a new permutation each epoch); ``start`` skips batches."""
    if batch_size > len(pairs):
        raise DataError(f"config.train.batch_size={batch_size} is larger than the {len(pairs)} train pairs")
    per_epoch = len(pairs) // batch_size
    step = start
    while True:
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(pairs))
        yield batch_arrays(pairs, order[k * batch_size:(k + 1) * batch_size])
        step += 1
