"""Task formats: cleaned ``Record``s -> token ids (one ``Example`` per row) with a fast tokenizer.

LM-style tasks (lm, text_to_text, chat) mark with ``weights`` which tokens are prediction
targets; the packer turns that into shifted ``targets`` and a ``loss_mask``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ftjax.data.records import DataError, Record

IGNORE = -100
LM_TASKS = ("lm", "text_to_text", "chat")
TASKS = ("lm", "classification", "pair_classification", "token_classification", "text_to_text", "chat")


@dataclasses.dataclass
class Example:
    ids: np.ndarray  # int32 [L]
    weights: np.ndarray | None = None  # float32 [L]: 1 = token is a prediction target (LM tasks)
    token_labels: np.ndarray | None = None  # int32 [L], IGNORE where unlabelled
    label: int = -1
    prompt_len: int = 0  # text_to_text: tokens before the answer
    cut: int = 0  # tokens truncation removed to fit seq_len (counted in the data report)


def label_index(labels: list[str]) -> dict[str, int]:
    return {name: i for i, name in enumerate(labels)}


def verbalizer_ids(cfg, tokenizer, labels: list[str]) -> list[list[int]]:
    """Token ids of each label's answer (``' ' + verbalizer`` and EOS) as it follows the prompt."""
    words = list(cfg.verbalizers) or labels
    if len(words) != len(labels):
        raise DataError(f"config.data.verbalizers has {len(words)} entries but there are {len(labels)} "
                        f"labels {labels}; give one verbalizer per label, in the same order")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [tokenizer(" " + w, add_special_tokens=False)["input_ids"] + eos for w in words]


def encode(cfg, tokenizer, records: list[Record], labels: list[str]
           ) -> tuple[list[Example], list[tuple[int, str]]]:
    """Tokenise ``records`` for ``cfg.task``; returns the examples and ``(index, reason)`` drops."""
    if cfg.task not in TASKS:
        raise DataError(f"config.data.task={cfg.task!r} is not one of {TASKS}")
    fn = {"lm": _lm, "classification": _classification, "pair_classification": _classification,
          "token_classification": _token_classification, "text_to_text": _text_to_text,
          "chat": _chat}[cfg.task]
    return fn(cfg, tokenizer, records, labels)


def _truncate(cfg, ids: list[int], limit: int) -> list[int] | None:
    """Apply config.data.truncation; None means drop the example."""
    if len(ids) <= limit:
        return ids
    if cfg.truncation == "drop":
        return None
    if cfg.truncation == "left":
        return ids[len(ids) - limit:]
    if cfg.truncation == "right":
        return ids[:limit]
    raise DataError(f"config.data.truncation={cfg.truncation!r} is not one of right, left, drop")


def _too_long(n: int, limit: int) -> str:
    return f"too long: {n} tokens > seq_len {limit} (truncation=drop)"


def _lm(cfg, tokenizer, records, labels):
    """Plain LM: every token is a target; documents longer than seq_len become several chunks."""
    enc = tokenizer([r.text for r in records], add_special_tokens=cfg.add_special_tokens)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for ids in enc:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        for start in range(0, len(ids), cfg.seq_len):
            chunk = np.asarray(ids[start:start + cfg.seq_len], np.int32)
            if len(chunk) > 1:
                out.append(Example(chunk, weights=np.ones(len(chunk), np.float32)))
            elif start and out:  # a 1-token tail predicts nothing: dropped, counted on the last chunk
                out[-1].cut += len(chunk)
    return out, []


def _classification(cfg, tokenizer, records, labels):
    index = label_index(labels)
    pair = [r.text_pair for r in records] if cfg.task == "pair_classification" else None
    enc = tokenizer([r.text for r in records], pair, add_special_tokens=cfg.add_special_tokens)["input_ids"]
    out, drops = [], []
    for i, (rec, ids) in enumerate(zip(records, enc)):
        full = len(ids)
        if full > cfg.seq_len:
            if cfg.truncation == "drop":
                drops.append((i, _too_long(full, cfg.seq_len)))
                continue
            ids = _truncated_encoding(cfg, tokenizer, rec)
        out.append(Example(np.asarray(ids, np.int32), label=index[rec.label], cut=full - len(ids)))
    return out, drops


def _truncated_encoding(cfg, tokenizer, rec: Record) -> list[int]:
    """Let the tokenizer truncate, so [CLS]/[SEP]/BOS survive (pairs: longest first)."""
    if cfg.truncation not in ("left", "right"):
        raise DataError(f"config.data.truncation={cfg.truncation!r} is not one of right, left, drop")
    side, tokenizer.truncation_side = tokenizer.truncation_side, cfg.truncation
    try:
        return tokenizer(rec.text, rec.text_pair or None, add_special_tokens=cfg.add_special_tokens,
                         truncation=True, max_length=cfg.seq_len)["input_ids"]
    finally:
        tokenizer.truncation_side = side


def _token_classification(cfg, tokenizer, records, labels):
    """Word-level tags -> sub-token labels: the first sub-token of a word carries its tag."""
    index = label_index(labels)
    enc = tokenizer([r.tokens for r in records], is_split_into_words=True,
                    add_special_tokens=cfg.add_special_tokens)
    out, drops = [], []
    for i, rec in enumerate(records):
        ids, words = enc["input_ids"][i], enc.word_ids(i)
        tl, prev = [], None
        for w in words:
            tl.append(IGNORE if w is None or w == prev else index[rec.tags[w]])
            prev = w
        full = len(ids)
        if full > cfg.seq_len:
            if cfg.truncation == "drop":
                drops.append((i, _too_long(full, cfg.seq_len)))
                continue
            ids, tl = _truncate(cfg, ids, cfg.seq_len), _truncate(cfg, tl, cfg.seq_len)
        out.append(Example(np.asarray(ids, np.int32), token_labels=np.asarray(tl, np.int32),
                           cut=full - len(ids)))
    return out, drops


def _text_to_text(cfg, tokenizer, records, labels):
    """Prompt template + verbalised label; only the answer tokens are targets."""
    index = label_index(labels)
    answers = verbalizer_ids(cfg, tokenizer, labels)
    try:
        prompts = [cfg.prompt_template.format(text=r.text, text_pair=r.text_pair) for r in records]
    except (KeyError, IndexError) as e:
        raise DataError(f"config.data.prompt_template={cfg.prompt_template!r}: unknown field {e}; "
                        f"use {{text}} and {{text_pair}}") from None
    enc = tokenizer(prompts, add_special_tokens=cfg.add_special_tokens)["input_ids"]
    longest = max(len(a) for a in answers)
    out, drops = [], []
    for i, (rec, prompt) in enumerate(zip(records, enc)):
        answer = answers[index[rec.label]]
        kept = _truncate(cfg, prompt, cfg.seq_len - longest)
        if kept is None:
            drops.append((i, _too_long(len(prompt) + longest, cfg.seq_len)))
            continue
        ids = np.asarray(kept + answer, np.int32)
        weights = np.zeros(len(ids), np.float32)
        weights[len(kept):] = 1.0
        out.append(Example(ids, weights=weights, label=index[rec.label], prompt_len=len(kept),
                           cut=len(prompt) - len(kept)))
    return out, drops


def _chat(cfg, tokenizer, records, labels):
    """Render with the tokenizer's chat template; only assistant turns are targets."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"task=chat needs a tokenizer with a chat template; {tokenizer.name_or_path!r} "
                        f"has none (set config.data.tokenizer to an instruct model's tokenizer)")
    out, drops = [], []
    for i, rec in enumerate(records):
        messages = list(rec.messages)
        if cfg.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        text, spans = _render(tokenizer, messages, rec.where)
        if not spans:
            drops.append((i, "no assistant turn"))
            continue
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        weights = [float(any(a <= s < b for a, b in spans)) for s, _ in offsets]
        kept = _truncate(cfg, ids, cfg.seq_len)
        if kept is None:
            drops.append((i, _too_long(len(ids), cfg.seq_len)))
            continue
        start = len(ids) - len(kept) if cfg.truncation == "left" else 0
        out.append(Example(np.asarray(kept, np.int32),
                           weights=np.asarray(weights[start:start + len(kept)], np.float32),
                           cut=len(ids) - len(kept)))
    return out, drops


def _render(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of each assistant reply (with its end tag)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:j], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[:j + 1], tokenize=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError(f"{where}: the chat template does not render conversations prefix by "
                            f"prefix, so assistant tokens cannot be located; use a standard template")
        spans.append((len(before), len(upto)))
    return text, spans
