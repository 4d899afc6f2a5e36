"""One task's data, read -> labels checked -> cleaned -> leakage-checked -> tokenised -> k-shot,
with a ``data_report.json`` and a quarantine file; cached under a hash of the config.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import shutil

import ml_collections
import numpy as np

from ftjax.data import clean, encode, sources
from ftjax.data.records import DataError, Record

CACHE_VERSION = 1
_LABELLED = ("classification", "pair_classification", "text_to_text")


@dataclasses.dataclass
class Prepared:
    examples: dict[str, list[encode.Example]]  # split -> examples
    labels: list[str]  # raw label values, index = label id
    label_names: list[str]
    report: dict
    quarantine: list[dict]


# ----------------------------------------------------------------------------- labels

def _check_labels(records: list[Record], labels: list[str], policy: str, split: str,
                  log: clean.SplitLog) -> list[Record]:
    known = set(labels)

    def bad(r: Record) -> list[str]:
        values = r.tags if r.tags is not None else [r.label]
        return sorted({str(v) for v in values if v not in known})

    unknown = [(r, bad(r)) for r in records]
    unknown = [(r, b) for r, b in unknown if b]
    if unknown and policy != "quarantine":
        listing = "\n".join(f"  {r.where}: {b}" for r, b in unknown[:20])
        more = f"\n  ... and {len(unknown) - 20} more rows" if len(unknown) > 20 else ""
        raise DataError(f"{split}: {len(unknown)} rows have labels outside the declared set {labels}:\n"
                        f"{listing}{more}\nFix the rows, add the labels to config.data.labels, or set "
                        f"config.data.unknown_labels='quarantine'")
    reasons = [f"unknown label {bad(r)}" for r in records]
    return log.remove(records, [not bad(r) for r in records], "labels", reasons)


def _label_set(cfg, train: list[Record]) -> list[str]:
    if cfg.task == "token_classification":
        seen = {t for r in train for t in r.tags}
    elif cfg.task in _LABELLED:
        seen = {r.label for r in train}
    else:
        return []
    return [str(x) for x in cfg.labels] if cfg.labels else sorted(seen)


# ----------------------------------------------------------------------------- k-shot

def kshot(records: list[Record], k: int, seed: int, draw: int) -> list[Record]:
    """``k`` rows per label, drawn without replacement by ``(seed, draw)``, in file order."""
    rng = np.random.default_rng([seed, draw])
    by_label: dict[str, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(records):
        by_label[r.label].append(i)
    chosen = []
    for label in sorted(by_label):
        idx = by_label[label]
        if len(idx) < k:
            raise DataError(f"k-shot: label {label!r} has only {len(idx)} train rows, fewer than "
                            f"config.data.kshot.k={k}")
        chosen.extend(rng.choice(idx, size=k, replace=False).tolist())
    return [records[i] for i in sorted(chosen)]


# ----------------------------------------------------------------------------- report

def _length_stats(examples: list[encode.Example]) -> dict:
    n = np.asarray([len(e.ids) for e in examples]) if examples else np.zeros(1)
    return {"min": int(n.min()), "mean": round(float(n.mean()), 2), "p50": int(np.percentile(n, 50)),
            "p95": int(np.percentile(n, 95)), "max": int(n.max()),
            "total": int(n.sum()) if examples else 0}


def _distribution(records: list[Record], cfg) -> dict[str, int]:
    if cfg.task == "token_classification":
        return dict(sorted(collections.Counter(t for r in records for t in r.tags).items()))
    if cfg.task in _LABELLED:
        return dict(sorted(collections.Counter(r.label for r in records).items()))
    return {}


# ----------------------------------------------------------------------------- prepare

def prepare(cfg: ml_collections.ConfigDict, tokenizer) -> Prepared:
    """Prepare every split of one (single-task) data config."""
    splits = sources.split_names(cfg)
    raw = {s: sources.read_split(cfg, s) for s in splits}
    labels = _label_set(cfg, raw["train"])
    logs = {s: clean.SplitLog() for s in splits}
    cleaned = {}
    for s, records in raw.items():
        logs[s].step("read", len(records))
        if labels:
            records = _check_labels(records, labels, cfg.unknown_labels, s, logs[s])
        cleaned[s] = clean.clean_split(records, cfg.clean, logs[s])
    report: dict = {"task": cfg.task, "seq_len": cfg.seq_len, "splits": {}}
    if "eval" in cleaned and cfg.clean.leakage != "off":
        leaked = set(clean.leakage(cleaned["train"], cleaned["eval"]))
        report["leakage"] = {"eval_rows_in_train": len(leaked), "removed": cfg.clean.leakage == "remove",
                             "examples": [cleaned["eval"][i].where for i in sorted(leaked)[:10]]}
        if cfg.clean.leakage == "remove":
            cleaned["eval"] = logs["eval"].remove(
                cleaned["eval"], [i not in leaked for i in range(len(cleaned["eval"]))], "leakage",
                ["also in train"] * len(cleaned["eval"]))
    if cfg.kshot.k:
        if cfg.task not in _LABELLED:
            raise DataError(f"config.data.kshot.k needs a labelled task, not task={cfg.task!r}")
        cleaned["train"] = kshot(cleaned["train"], cfg.kshot.k, cfg.kshot.seed, cfg.kshot.draw)
        logs["train"].step("kshot", len(cleaned["train"]), k=cfg.kshot.k, draw=cfg.kshot.draw)
    if cfg.max_examples and len(cleaned["train"]) > cfg.max_examples:
        cleaned["train"] = cleaned["train"][:cfg.max_examples]
        logs["train"].step("max_examples", len(cleaned["train"]))
    examples = {}
    for s, records in cleaned.items():
        examples[s], drops = encode.encode(cfg, tokenizer, records, labels)
        if drops:
            dropped = dict(drops)
            logs[s].remove(records, [i not in dropped for i in range(len(records))], "tokenize",
                           [dropped.get(i, "") for i in range(len(records))])
        kept = [r for i, r in enumerate(records) if i not in dict(drops)]
        report["splits"][s] = {"source": splits[s], "steps": logs[s].steps, "rows": len(kept),
                               "examples": len(examples[s]), "labels": _distribution(kept, cfg),
                               "tokens": _length_stats(examples[s])}
    quarantine = [dict(split=s, **q) for s in splits for q in logs[s].quarantine]
    report["quarantined"] = len(quarantine)
    names = [str(x) for x in cfg.label_names] if cfg.label_names else list(labels)
    if len(names) != len(labels):
        raise DataError(f"config.data.label_names has {len(names)} entries for {len(labels)} labels {labels}")
    report["label_names"] = names
    return Prepared(examples, labels, names, report, quarantine)


# ----------------------------------------------------------------------------- cache

def cache_key(cfg: ml_collections.ConfigDict, tokenizer) -> str:
    """Hash of the data config, the tokenizer and the cache format: equal keys, equal arrays."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else tokenizer.name_or_path).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(f"{CACHE_VERSION}".encode())
    return h.hexdigest()[:16]


def save(prepared: Prepared, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for split, exs in prepared.examples.items():
        arrays = {"offsets": np.cumsum([0] + [len(e.ids) for e in exs]),
                  "ids": _cat([e.ids for e in exs], np.int32),
                  "label": np.asarray([e.label for e in exs], np.int32),
                  "prompt_len": np.asarray([e.prompt_len for e in exs], np.int32)}
        if exs and exs[0].weights is not None:
            arrays["weights"] = _cat([e.weights for e in exs], np.float32)
        if exs and exs[0].token_labels is not None:
            arrays["token_labels"] = _cat([e.token_labels for e in exs], np.int32)
        np.savez(os.path.join(directory, f"{split}.npz"), **arrays)
    with open(os.path.join(directory, "data_report.json"), "w") as f:
        json.dump(prepared.report, f, indent=1)
    with open(os.path.join(directory, "quarantine.jsonl"), "w") as f:
        for row in prepared.quarantine:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(os.path.join(directory, "labels.json"), "w") as f:
        json.dump({"labels": prepared.labels, "label_names": prepared.label_names,
                   "splits": list(prepared.examples)}, f)


def load(directory: str) -> Prepared:
    with open(os.path.join(directory, "labels.json")) as f:
        meta = json.load(f)
    with open(os.path.join(directory, "data_report.json")) as f:
        report = json.load(f)
    examples = {}
    for split in meta["splits"]:
        with np.load(os.path.join(directory, f"{split}.npz")) as f:
            z = dict(f)  # read each array once, not once per example
        off = z["offsets"]
        examples[split] = [
            encode.Example(z["ids"][a:b],
                           weights=z["weights"][a:b] if "weights" in z else None,
                           token_labels=z["token_labels"][a:b] if "token_labels" in z else None,
                           label=int(z["label"][i]), prompt_len=int(z["prompt_len"][i]))
            for i, (a, b) in enumerate(zip(off[:-1], off[1:]))]
    return Prepared(examples, meta["labels"], meta["label_names"], report, [])


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def prepare_cached(cfg: ml_collections.ConfigDict, tokenizer, cache_dir: str | None) -> tuple[Prepared, str | None]:
    """``prepare`` with a cache under ``cache_dir/<cache_key>``; returns the directory used."""
    if not cache_dir:
        return prepare(cfg, tokenizer), None
    directory = os.path.join(cache_dir, cache_key(cfg, tokenizer))
    if os.path.exists(os.path.join(directory, "labels.json")):
        return load(directory), directory
    prepared = prepare(cfg, tokenizer)
    tmp = f"{directory}.tmp{os.getpid()}"
    save(prepared, tmp)
    if os.path.exists(directory):  # another process got there first: same key, same arrays
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, directory)
    return prepared, directory


def summary(report: dict) -> str:
    """A few printable lines: rows after each step, labels and token lengths per split."""
    lines = [f"task={report['task']} seq_len={report['seq_len']} quarantined={report['quarantined']}"]
    for split, r in report["splits"].items():
        steps = " -> ".join(f"{s['step']} {s['rows']}" for s in r["steps"])
        lines.append(f"[{split}] {r['source']}\n  rows: {steps}; examples {r['examples']}")
        if r["labels"]:
            lines.append(f"  labels: {r['labels']}")
        t = r["tokens"]
        lines.append(f"  tokens: min {t['min']} mean {t['mean']} p95 {t['p95']} max {t['max']}")
    if "leakage" in report:
        lines.append(f"  leakage: {report['leakage']['eval_rows_in_train']} eval rows also in train"
                     f"{' (removed)' if report['leakage']['removed'] else ''}")
    return "\n".join(lines)
