"""Read one split into ``Record`` rows: local files, Hugging Face ``datasets`` or TFDS.

Formats: ``text`` (one document per line), ``label_text`` (``LABEL TEXT``), ``text_label``
(``TEXT@LABEL``), ``csv`` / ``tsv`` (with or without header), ``jsonl`` / ``json``, ``parquet``,
``conll`` (token columns, blank line between sentences), ``hf`` and ``tfds``.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterable

import ml_collections

from ftjax.data.records import DataError, Record
from ftjax.errors import require

_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json",
               ".parquet": "parquet", ".conll": "conll", ".txt": "text"}
FORMATS = ("text", "label_text", "text_label", "csv", "tsv", "jsonl", "json", "parquet",
           "conll", "hf", "tfds")


def split_names(cfg: ml_collections.ConfigDict) -> dict[str, str]:
    """``{"train": <origin>, "eval": <origin>}`` for the splits this config defines."""
    fmt = resolve_format(cfg, cfg.train_path)
    if fmt == "hf":
        return {"train": cfg.hf.train_split, **({"eval": cfg.hf.eval_split} if cfg.hf.eval_split else {})}
    if fmt == "tfds":
        return {"train": cfg.tfds.train_split, **({"eval": cfg.tfds.eval_split} if cfg.tfds.eval_split else {})}
    out = {"train": cfg.train_path}
    if cfg.eval_path:
        out["eval"] = cfg.eval_path
    return out


def resolve_format(cfg: ml_collections.ConfigDict, path: str) -> str:
    if cfg.format != "auto":
        if cfg.format not in FORMATS:
            raise DataError(f"config.data.format={cfg.format!r} is not one of {FORMATS}")
        return cfg.format
    if cfg.hf.name:
        return "hf"
    if cfg.tfds.name:
        return "tfds"
    if not path:
        raise DataError("config.data has no source: set train_path (a local file), hf.name or tfds.name")
    fmt = _EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise DataError(f"{path}: cannot tell the format from the extension; set config.data.format "
                        f"to one of {FORMATS}")
    if fmt == "text" and cfg.task == "token_classification":
        return "conll"
    return fmt


def read_split(cfg: ml_collections.ConfigDict, split: str) -> list[Record]:
    """All rows of ``split`` ("train" or "eval") as ``Record``s, in file order."""
    origin = split_names(cfg)[split]
    fmt = resolve_format(cfg, cfg.train_path)
    if fmt == "hf":
        return _read_hf(cfg, origin)
    if fmt == "tfds":
        return _read_tfds(cfg, origin)
    fmt = resolve_format(cfg, origin)
    if fmt == "parquet":
        return _from_dicts(cfg, _read_parquet(origin), origin)
    lines = read_lines(origin, cfg.encoding)
    if fmt == "text":
        return [Record(f"{origin}:{i}", text=line) for i, line in lines]
    if fmt == "label_text":
        return [_label_text(origin, i, line) for i, line in lines if line.strip()]
    if fmt == "text_label":
        return [_text_label(origin, i, line, cfg.label_separator) for i, line in lines if line.strip()]
    if fmt in ("csv", "tsv"):
        return _from_dicts(cfg, _read_delimited(cfg, origin, lines, "\t" if fmt == "tsv" else ","), origin)
    if fmt == "jsonl":
        return _from_dicts(cfg, _read_jsonl(origin, lines), origin)
    if fmt == "json":
        return _from_dicts(cfg, _read_json(origin, "\n".join(line for _, line in lines)), origin)
    return _read_conll(origin, lines, cfg.conll_tag_column)


# ----------------------------------------------------------------------------- text and lines

def read_lines(path: str, encoding: str = "") -> list[tuple[int, str]]:
    """``(line_number, line)`` pairs (1-based, no line ending) of a text file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found; check config.data.train_path / eval_path "
                        f"(relative paths are relative to {os.getcwd()})")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode(encoding or "utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        guess = "iso-8859-1" if (encoding or "utf-8").lower().replace("_", "-") in ("utf-8", "utf8") else "utf-8"
        raise DataError(
            f"{path}:{line}: not valid {encoding or 'UTF-8'} (byte 0x{raw[e.start]:02x} at offset "
            f"{e.start}); if the file is in another encoding set config.data.encoding, e.g. "
            f"--config.data.encoding={guess}") from None
    except LookupError:
        raise DataError(f"config.data.encoding={encoding!r} is not a known encoding "
                        f"(try utf-8, iso-8859-1, cp1252)") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return list(enumerate(text.splitlines(), start=1))


def _label_text(path: str, i: int, line: str) -> Record:
    label, sep, text = line.strip().partition(" ")
    if not sep or not text.strip():
        raise DataError(f"{path}:{i}: expected 'LABEL TEXT' (label, a space, the text), got {line[:80]!r}; "
                        f"fix the line or set config.data.format to the file's real format")
    return Record(f"{path}:{i}", text=text, label=label)


def _text_label(path: str, i: int, line: str, sep: str) -> Record:
    text, found, label = line.rstrip().rpartition(sep)
    if not found:
        raise DataError(f"{path}:{i}: expected 'TEXT{sep}LABEL', found no {sep!r} in {line[:80]!r}; "
                        f"fix the line or set config.data.label_separator")
    return Record(f"{path}:{i}", text=text, label=label.strip())


# ----------------------------------------------------------------------------- tables

def _read_delimited(cfg, path: str, lines: list[tuple[int, str]], delimiter: str
                    ) -> Iterable[tuple[int, dict[str, Any]]]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    numbers = [i for i, line in lines if line.strip()]
    rows = list(csv.reader((line for _, line in lines if line.strip()), delimiter=delimiter, quoting=quoting))
    if not rows:
        return []
    wanted = [f for f in (cfg.text_field, cfg.label_field) if f]
    header = cfg.header
    if header == "auto":
        header = "yes" if any(f in rows[0] for f in wanted if not f.isdigit()) else "no"
    if header == "yes":
        names, rows, numbers = rows[0], rows[1:], numbers[1:]
    else:
        names = [str(i) for i in range(max(len(r) for r in rows))]
    for field in _fields(cfg):
        if field not in names:
            raise DataError(f"{path}:1: column {field!r} not found; columns are {names}. Set "
                            f"config.data.text_field / label_field (a column index for files without "
                            f"a header) or config.data.header")
    out = []
    for n, row in zip(numbers, rows):
        if len(row) != len(names):
            raise DataError(f"{path}:{n}: expected {len(names)} {'tab' if delimiter == chr(9) else 'comma'}-"
                            f"separated fields, got {len(row)}; fix the row (quote fields that "
                            f"contain the delimiter)")
        out.append((n, dict(zip(names, row))))
    return out


def _read_jsonl(path: str, lines: list[tuple[int, str]]) -> list[tuple[int, dict]]:
    out = []
    for i, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno}); each line must "
                            f"be one JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object per line, got {type(obj).__name__}")
        out.append((i, obj))
    return out


def _read_json(path: str, text: str) -> list[tuple[int, dict]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected a list of objects") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{path}:1: expected a JSON list of objects (or {{\"data\": [...]}})")
    return [(i, row) for i, row in enumerate(obj)]


def _read_parquet(path: str) -> list[tuple[int, dict]]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found; check config.data.train_path / eval_path")
    import pyarrow.parquet as pq
    return list(enumerate(pq.read_table(path).to_pylist()))


def _fields(cfg) -> list[str]:
    if cfg.task == "chat":
        return [cfg.text_field, cfg.response_field] if cfg.response_field else [cfg.messages_field]
    if cfg.task == "preference":
        return [f for f in (cfg.text_field, cfg.chosen_field, cfg.rejected_field) if f]
    fields = [cfg.text_field]
    if cfg.task == "pair_classification":
        fields.append(cfg.text_pair_field)
    if cfg.task != "lm":
        fields.append(cfg.label_field)
    return [f for f in fields if f]


def _from_dicts(cfg, rows: Iterable[tuple[Any, dict]], origin: str, label_names=None) -> list[Record]:
    """Map dict rows (csv, json, hub, tfds) to Records with the configured field names."""
    out = []
    fields = _fields(cfg)
    for i, row in rows:
        where = f"{origin}:{i}"
        missing = [f for f in fields if f not in row]
        if missing:
            raise DataError(f"{where}: fields {missing} missing; the row has {sorted(row)}. Set "
                            f"config.data.text_field / text_pair_field / label_field / messages_field")
        rec = Record(where)
        if cfg.task == "chat":
            if cfg.response_field:
                rec.messages = [{"role": "user", "content": str(row[cfg.text_field])},
                                {"role": "assistant", "content": str(row[cfg.response_field])}]
            else:
                rec.messages = _messages(where, row[cfg.messages_field])
        elif cfg.task == "preference":
            prompt = row[cfg.text_field] if cfg.text_field else ""
            if isinstance(prompt, list):
                rec.messages = _messages(where, prompt)
            else:
                rec.text = _text(prompt)
            rec.responses = [_response(where, row[f]) for f in (cfg.chosen_field, cfg.rejected_field)]
        elif cfg.task == "token_classification":
            rec.tokens = [str(t) for t in row[cfg.text_field]]
            rec.text = " ".join(rec.tokens)  # what cleaning judges emptiness and duplicates by
            tags = row[cfg.label_field]
            rec.tags = [str(label_names[t] if label_names else t) for t in tags]
        else:
            rec.text = _text(row[cfg.text_field])
            if cfg.task == "pair_classification":
                rec.text_pair = _text(row[cfg.text_pair_field])
            if cfg.task != "lm":
                value = row[cfg.label_field]
                rec.label = str(label_names[value] if label_names else value).strip()
        out.append(rec)
    return out


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _response(where: str, value) -> str | list[dict]:
    """A preference response: text, or a list of chat messages."""
    return _messages(where, value) if isinstance(value, list) else _text(value)


def _messages(where: str, value) -> list[dict]:
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                              for m in value):
        raise DataError(f"{where}: messages must be a list of {{'role': ..., 'content': ...}} objects")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


# ----------------------------------------------------------------------------- conll

def _read_conll(path: str, lines: list[tuple[int, str]], tag_column: int) -> list[Record]:
    out, tokens, tags, start = [], [], [], 0
    for i, line in lines + [(len(lines) + 1, "")]:
        cols = line.split()
        if not cols:
            if tokens:
                out.append(Record(f"{path}:{start}", text=" ".join(tokens), tokens=tokens, tags=tags))
            tokens, tags = [], []
            continue
        if cols[0] == "-DOCSTART-":
            continue
        if len(cols) < 2:
            raise DataError(f"{path}:{i}: a CoNLL line needs a token and a tag column, got {line!r}; "
                            f"separate sentences with an empty line")
        try:
            tag = cols[tag_column]
        except IndexError:
            raise DataError(f"{path}:{i}: no column {tag_column} in {line!r}; set "
                            f"config.data.conll_tag_column") from None
        if not tokens:
            start = i
        tokens.append(cols[0])
        tags.append(tag)
    return out


# ----------------------------------------------------------------------------- hub and tfds

def _read_hf(cfg, split: str) -> list[Record]:
    import datasets
    hf = cfg.hf
    origin = f"{hf.name}[{split}]"
    try:
        if os.path.isdir(hf.name) and os.path.exists(os.path.join(hf.name, "dataset_dict.json")):
            ds = datasets.load_from_disk(hf.name)[split]
        elif os.path.isdir(hf.name) and os.path.exists(os.path.join(hf.name, "dataset_info.json")):
            ds = datasets.load_from_disk(hf.name)
        else:
            ds = datasets.load_dataset(hf.name, hf.config or None, split=split,
                                       data_dir=hf.data_dir or None)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise DataError(f"{origin}: cannot load the Hugging Face data set ({e}); check config.data.hf.name "
                        f"(hub id or local folder), hf.config and the split names") from None
    feature = ds.features.get(cfg.label_field)
    names = getattr(feature, "names", None) or getattr(getattr(feature, "feature", None), "names", None)
    return _from_dicts(cfg, enumerate(ds), origin, label_names=names)


def _read_tfds(cfg, split: str) -> list[Record]:
    t = cfg.tfds
    origin = f"{t.name}[{split}]"
    tfds = require("tensorflow_datasets", "tfds", f"{origin}: reading a TFDS data set (config.data.tfds)")
    try:
        builder = tfds.builder(t.name, data_dir=t.data_dir or None)
        source = tfds.data_source(t.name, split=split, data_dir=t.data_dir or None)
    except Exception as e:  # tfds raises many types for a missing/unprepared data set
        raise DataError(f"{origin}: cannot open the prepared TFDS data set ({e}); check config.data.tfds.name "
                        f"and tfds.data_dir (run the builder's download_and_prepare first)") from None
    feature = builder.info.features[cfg.label_field] if cfg.label_field in builder.info.features else None
    names = getattr(feature, "names", None)
    return _from_dicts(cfg, ((i, source[i]) for i in range(len(source))), origin, label_names=names)
