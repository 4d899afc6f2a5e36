"""One task's data, read -> labels checked -> cleaned -> leakage-checked -> subset -> k-shot ->
tokenised, with a ``data_report.json`` and a quarantine file; cached under a hash of the config.

The report counts every row each step removed, the rows (and tokens) truncation cut to fit
``seq_len``, and lists warnings (a single-class train split) that ``config.data.strict`` turns
into errors. The cache directory is an ``etils.epath.Path``, so ``gs://`` works like a folder.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from ftjax import paths
from ftjax.data import clean, encode, privacy, sources
from ftjax.data.records import DataError, Record

CACHE_VERSION = 3  # 2: the report counts truncation and lists warnings; 3: source stamps in the key
_LABELLED = ("classification", "pair_classification", "text_to_text")


@dataclasses.dataclass
class Prepared:
    examples: dict[str, list[encode.Example]]  # split -> examples
    labels: list[str]  # raw label values, index = label id
    label_names: list[str]
    report: dict
    quarantine: list[dict]
    privacy_log: list[dict] = dataclasses.field(default_factory=list)  # data.privacy's changes


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


# ----------------------------------------------------------------------------- subsets

def subset(records: list[Record], fraction: float, seed: int) -> list[Record]:
    """The first ``round(fraction * len(records))`` rows of one permutation seeded by ``seed``
    alone, in file order: every smaller fraction's rows lie inside every larger one's."""
    if not 0 < fraction <= 1:
        raise DataError(f"config.data.subset.fraction={fraction} is not in (0, 1]; it is the share of "
                        "the train rows to keep (e.g. 0.25)")
    n = round(fraction * len(records))
    if n < 1:
        raise DataError(f"config.data.subset.fraction={fraction} of the {len(records)} cleaned train rows "
                        f"keeps no row; use a fraction of at least {1 / len(records):.3g}")
    order = np.random.default_rng([seed, 0x5B5E7]).permutation(len(records))
    return [records[i] for i in np.sort(order[:n])]


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


def _truncated(examples: list[encode.Example]) -> dict[str, int]:
    return {"rows": sum(e.cut > 0 for e in examples), "tokens_cut": sum(e.cut for e in examples)}


def _warnings(cfg, report: dict) -> list[str]:
    """What trains without an error but is almost certainly wrong."""
    train = report["splits"]["train"]
    if cfg.task in _LABELLED and len(train["labels"]) == 1:
        (label,) = train["labels"]
        return [f"{train['source']}: every train row has the label {label!r} (a single class), so the "
                f"model can only learn to predict it; check the file and config.data.label_field"]
    return []


def _source_field(cfg, split: str) -> str:
    fmt = sources.resolve_format(cfg, cfg.train_path)
    return f"config.data.{fmt}.{split}_split" if fmt in ("hf", "tfds") else f"config.data.{split}_path"


def _all_removed(origin: str, split: str, log: clean.SplitLog) -> str:
    removed = ", ".join(f"{s['step']} {s['removed']}" for s in log.steps if s.get("removed"))
    return (f"{origin}: all {log.steps[0]['rows']} {split} rows were removed while preparing "
            f"(removed by {removed}); see the quarantine file or relax config.data.clean")


# ----------------------------------------------------------------------------- prepare

def prepare(cfg: ml_collections.ConfigDict, tokenizer) -> Prepared:
    """Prepare every split of one (single-task) data config."""
    privacy.check(cfg.privacy)
    splits = sources.split_names(cfg)
    raw = {s: sources.read_split(cfg, s) for s in splits}
    for s, records in raw.items():  # fail here, naming the source, not inside the tokenizer
        if not records:
            raise DataError(f"{splits[s]}: the {s} split has no rows (is the file empty?); check "
                            f"{_source_field(cfg, s)}")
    labels = _label_set(cfg, raw["train"])
    logs = {s: clean.SplitLog() for s in splits}
    cleaned = {}
    for s, records in raw.items():
        logs[s].step("read", len(records))
        if labels:
            records = _check_labels(records, labels, cfg.unknown_labels, s, logs[s])
        cleaned[s] = clean.clean_split(records, cfg.clean, logs[s])
    cleaned, found = privacy.apply(cfg.privacy, cleaned, logs)
    report: dict = {"task": cfg.task, "seq_len": cfg.seq_len, "splits": {}}
    if found:
        report["privacy"] = found.report
    if "eval" in cleaned and cfg.clean.leakage != "off":
        leaked = set(clean.leakage(cleaned["train"], cleaned["eval"]))
        report["leakage"] = {"eval_rows_in_train": len(leaked), "removed": cfg.clean.leakage == "remove",
                             "examples": [cleaned["eval"][i].where for i in sorted(leaked)[:10]]}
        if cfg.clean.leakage == "remove":
            cleaned["eval"] = logs["eval"].remove(
                cleaned["eval"], [i not in leaked for i in range(len(cleaned["eval"]))], "leakage",
                ["also in train"] * len(cleaned["eval"]))
    if cfg.subset.fraction != 1:
        cleaned["train"] = subset(cleaned["train"], cfg.subset.fraction, cfg.subset.seed)
        logs["train"].step("subset", len(cleaned["train"]), fraction=cfg.subset.fraction,
                           seed=cfg.subset.seed)
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
        if not records:
            raise DataError(_all_removed(splits[s], s, logs[s]))
        examples[s], drops = encode.encode(cfg, tokenizer, records, labels)
        if drops:
            dropped = dict(drops)
            logs[s].remove(records, [i not in dropped for i in range(len(records))], "tokenize",
                           [dropped.get(i, "") for i in range(len(records))])
        kept = [r for i, r in enumerate(records) if i not in dict(drops)]
        report["splits"][s] = {"source": splits[s], "steps": logs[s].steps, "rows": len(kept),
                               "examples": len(examples[s]), "labels": _distribution(kept, cfg),
                               "tokens": _length_stats(examples[s]), "truncated": _truncated(examples[s])}
    quarantine = [dict(split=s, **q) for s in splits for q in logs[s].quarantine]
    report["quarantined"] = len(quarantine)
    names = [str(x) for x in cfg.label_names] if cfg.label_names else list(labels)
    if len(names) != len(labels):
        raise DataError(f"config.data.label_names has {len(names)} entries for {len(labels)} labels {labels}")
    report["label_names"] = names
    report["warnings"] = _warnings(cfg, report)
    if cfg.strict and report["warnings"]:
        raise DataError("; ".join(report["warnings"]) + " (an error because config.data.strict=True)")
    _log_warnings(report)
    return Prepared(examples, labels, names, report, quarantine, found.log if found else [])


def _log_warnings(report: dict) -> None:
    for warning in report.get("warnings", []):
        logging.warning("data: %s", warning)


# ----------------------------------------------------------------------------- cache

def cache_dir(cfg: ml_collections.ConfigDict) -> str | None:
    """Where prepared data is cached: ``cfg.cache_dir``, else ``$FTJAX_CACHE/data`` (by default
    ``~/.cache/ftjax/data``); None for ``cache_dir="none"``."""
    if cfg.cache_dir == "none":
        return None
    if cfg.cache_dir:
        return cfg.cache_dir
    return os.path.join(paths.cache_root(), "data")


_HASHED_SOURCE_BYTES = 256 << 20  # larger source files are known by size and mtime alone


def _source_stamps(cfg: ml_collections.ConfigDict) -> list:
    """Each local source file's path and content hash (size and mtime above 256 MiB): an
    edited file gets a new cache key."""
    stamps = []
    for path in (cfg.train_path, cfg.eval_path):
        if not path or paths.is_url(path) or not os.path.isfile(path):
            continue
        st = os.stat(path)
        if st.st_size <= _HASHED_SOURCE_BYTES:
            with open(path, "rb") as f:
                stamps.append([os.path.abspath(path), hashlib.file_digest(f, "sha256").hexdigest()])
        else:
            stamps.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return stamps


def cache_key(cfg: ml_collections.ConfigDict, tokenizer) -> str:
    """Hash of the data config (but its ``cache_dir``), the source files' sizes and times, the
    tokenizer and the cache format: equal keys, equal arrays."""
    fields = {k: v for k, v in cfg.to_dict().items() if k != "cache_dir"}
    h = hashlib.sha256(json.dumps([fields, _source_stamps(cfg)], sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # without the truncation/padding state the last call left behind
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(tokenizer.name_or_path.encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(f"{CACHE_VERSION}".encode())
    return h.hexdigest()[:16]


def save(prepared: Prepared, directory: str | os.PathLike) -> None:
    """Write the arrays, report and quarantine, then ``labels.json``: its presence marks a
    complete cache. Each file is replaced whole, so a concurrent reader never sees half of one."""
    directory = paths.as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split, exs in prepared.examples.items():
        arrays = {"offsets": np.cumsum([0] + [len(e.ids) for e in exs]),
                  "ids": _cat([e.ids for e in exs], np.int32),
                  "label": np.asarray([e.label for e in exs], np.int32),
                  "prompt_len": np.asarray([e.prompt_len for e in exs], np.int32)}
        if exs and exs[0].weights is not None:
            arrays["weights"] = _cat([e.weights for e in exs], np.float32)
        if exs and exs[0].token_labels is not None:
            arrays["token_labels"] = _cat([e.token_labels for e in exs], np.int32)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        _write(directory / f"{split}.npz", buffer.getvalue())
    _write(directory / "data_report.json", json.dumps(prepared.report, indent=1).encode())
    _write(directory / "quarantine.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                                   for row in prepared.quarantine).encode())
    if "privacy" in prepared.report:
        _write(directory / privacy.LOG_FILE, "".join(json.dumps(line) + "\n"
                                                      for line in prepared.privacy_log).encode())
    meta = {"labels": prepared.labels, "label_names": prepared.label_names, "splits": list(prepared.examples)}
    _write(directory / "labels.json", json.dumps(meta).encode())


def _write(path: epath.Path, data: bytes) -> None:
    """Object stores replace an object only once its upload completes; locally, write a
    temporary file and rename it over ``path`` (as ``ftjax.paths.write_text_atomic`` does)."""
    if paths.is_url(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def load(directory: str | os.PathLike) -> Prepared:
    directory = paths.as_path(directory)
    meta = json.loads((directory / "labels.json").read_text())
    report = json.loads((directory / "data_report.json").read_text())
    examples = {}
    for split in meta["splits"]:
        with np.load(io.BytesIO((directory / f"{split}.npz").read_bytes())) as f:
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


def prepare_cached(cfg: ml_collections.ConfigDict, tokenizer, cache_dir: str | os.PathLike | None
                   ) -> tuple[Prepared, epath.Path | None]:
    """``prepare`` with a cache under ``cache_dir/<cache_key>`` (a folder or a ``gs://`` URL);
    returns the directory used. Two processes preparing the same key write the same files."""
    if not cache_dir:
        return prepare(cfg, tokenizer), None
    directory = paths.as_path(cache_dir) / cache_key(cfg, tokenizer)
    if (directory / "labels.json").exists():
        prepared = load(directory)
        _log_warnings(prepared.report)
        return prepared, directory
    prepared = prepare(cfg, tokenizer)
    save(prepared, directory)
    return prepared, directory


def summary(report: dict) -> str:
    """A few printable lines: rows after each step, labels and token lengths per split."""
    lines = [f"task={report['task']} seq_len={report['seq_len']} quarantined={report['quarantined']}"]
    for split, r in report["splits"].items():
        steps = " -> ".join(f"{s['step']} {s['rows']}" for s in r["steps"])
        lines.append(f"[{split}] {r['source']}\n  rows: {steps}; examples {r['examples']}")
        if r["labels"]:
            lines.append(f"  labels: {r['labels']}")
        t, cut = r["tokens"], r["truncated"]
        lines.append(f"  tokens: min {t['min']} mean {t['mean']} p95 {t['p95']} max {t['max']}; "
                     f"truncated {cut['rows']} rows ({cut['tokens_cut']} tokens cut)")
    if "leakage" in report:
        lines.append(f"  leakage: {report['leakage']['eval_rows_in_train']} eval rows also in train"
                     f"{' (removed)' if report['leakage']['removed'] else ''}")
    if "privacy" in report:
        lines.extend(privacy.summary(report["privacy"]))
    lines.extend(f"  warning: {w}" for w in report["warnings"])
    return "\n".join(lines)
