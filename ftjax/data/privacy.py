"""The ``data.privacy`` step: personal data in every split's text, found by presidio-analyzer's
predefined recognisers, then redacted, pseudonymised or quarantined.

Recognisers: e-mail (pattern + ``tldextract`` domain check), phone (Google's ``phonenumbers``
matcher, regions US GB DE FR IL IN CA BR), credit card (pattern + Luhn), IBAN (pattern +
checksum), IP (v4/v6 patterns + ``ipaddress``) and, only with a spaCy pipeline in
``ner_model``, person names (the pipeline's NER). Without one, presidio runs on its ``no_op``
NLP engine (no model; context words in the text do not raise scores) and the report says that
names were not searched.

The step runs on the cleaned rows (after dedup), before the train/eval leakage check; spans are
character offsets ``[start, end)`` into a field's cleaned text. Nothing here writes a value in
clear except the opt-in ``originals_path`` file the leakage check (``ftjax.eval.leakage``)
reads: the log carries an HMAC of each value under a random key that is never stored, so equal
hashes mean equal values within one preparation and nothing can be brute-forced back from them.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import time
from importlib import metadata

from ftjax import paths
from ftjax.data import clean
from ftjax.data.records import DataError, Record
from ftjax.errors import require

MODES = ("off", "redact", "pseudonymise", "quarantine")
# our name -> (presidio entity, placeholder stem)
ENTITIES = {"email": ("EMAIL_ADDRESS", "EMAIL"), "phone": ("PHONE_NUMBER", "PHONE"),
            "credit_card": ("CREDIT_CARD", "CREDIT_CARD"), "iban": ("IBAN_CODE", "IBAN"),
            "ip": ("IP_ADDRESS", "IP"), "person": ("PERSON", "PERSON")}
LOG_FILE = "privacy_log.jsonl"
_PREFIX_CHARS = 500  # text kept before each value in the originals file (the leakage prompt)


def check(c) -> None:
    """One clear error for a bad ``config.data.privacy``."""
    where = "config.data.privacy"
    if c.mode not in MODES:
        raise DataError(f"{where}.mode={c.mode!r}; choose one of {list(MODES)}")
    unknown = [e for e in c.entities if e not in ENTITIES]
    if unknown or not c.entities:
        raise DataError(f"{where}.entities={list(c.entities)}: {unknown or 'empty'}; choose from "
                        f"{list(ENTITIES)}")
    if not 0 <= c.min_score <= 1:
        raise DataError(f"{where}.min_score={c.min_score} is not in [0, 1]")
    if c.ner_model and c.mode != "off":
        spacy = require("spacy", "privacy", f"{where}.ner_model")
        if not (os.path.isdir(os.path.expanduser(c.ner_model)) or spacy.util.is_package(c.ner_model)):
            raise DataError(f"{where}.ner_model={c.ner_model!r} is neither a spaCy pipeline folder nor "
                            f"an installed spaCy package; give a folder written by nlp.to_disk or "
                            f"leave it empty (names are then not searched)")


# ----------------------------------------------------------------------------- detection

@dataclasses.dataclass(frozen=True)
class Finding:
    entity: str  # our name (ENTITIES)
    start: int
    end: int
    score: float


class Detector:
    """presidio's ``AnalyzerEngine`` over only the recognisers ``c.entities`` asks for."""

    def __init__(self, c):
        # tldextract (the e-mail check) would fetch the public-suffix list from the internet;
        # an empty URL list makes it use its bundled snapshot.
        os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
        require("presidio_analyzer", "privacy", "config.data.privacy")
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer import predefined_recognizers as pr
        from presidio_analyzer.nlp_engine import NoOpNlpEngine, SpacyNlpEngine

        patterns = {"email": pr.EmailRecognizer, "phone": pr.PhoneRecognizer,
                    "credit_card": pr.CreditCardRecognizer, "iban": pr.IbanRecognizer,
                    "ip": pr.IpRecognizer}
        recognisers = [patterns[e]() for e in c.entities if e in patterns]
        self.searched = [e for e in c.entities if e in patterns]
        self.not_searched = {}
        names = "person" in c.entities
        if names and c.ner_model:
            model = os.path.expanduser(c.ner_model)
            engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": model}])
            recognisers.append(pr.SpacyRecognizer(supported_entities=["PERSON"]))
            self.searched.append("person")
            nlp = f"spaCy pipeline {c.ner_model} (its NER finds names; its lemmas feed context words)"
        else:
            engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "no_op"}])
            nlp = "no_op (no model: patterns and validators only, context words not used)"
            if names:
                self.not_searched["person"] = ("NOT searched: config.data.privacy.ner_model is empty "
                                               "(give a spaCy pipeline with an NER to search names)")
        self.engine = f"presidio-analyzer {metadata.version('presidio_analyzer')}, NLP engine {nlp}"
        self._analyzer = AnalyzerEngine(
            registry=RecognizerRegistry(recognizers=recognisers, supported_languages=["en"]),
            nlp_engine=engine, supported_languages=["en"])
        self._entities = [ENTITIES[e][0] for e in self.searched]
        self._ours = {ENTITIES[e][0]: e for e in self.searched}
        self._min_score = float(c.min_score)

    def find(self, text: str) -> list[Finding]:
        """Non-overlapping findings in ``text``, in order; of overlapping ones the higher score
        (then the longer span) wins, e.g. a Luhn-valid card number over a phone match inside it."""
        if not text.strip():
            return []
        results = self._analyzer.analyze(text, language="en", entities=self._entities,
                                         score_threshold=self._min_score)
        results = sorted(results, key=lambda r: (-r.score, -(r.end - r.start), r.start))
        kept: list[Finding] = []
        for r in results:
            if all(r.end <= k.start or r.start >= k.end for k in kept):
                kept.append(Finding(self._ours[r.entity_type], r.start, r.end, round(float(r.score), 4)))
        return sorted(kept, key=lambda f: f.start)


# ----------------------------------------------------------------------------- fields of a row

def fields(rec: Record) -> list[tuple[str, str]]:
    """``(name, text)`` of every free-text field of a row: ``text``, ``text_pair``,
    ``messages[i]`` contents and ``responses[j]`` (or ``responses[j][i]`` for chat responses)."""
    out = [(n, getattr(rec, n)) for n in ("text", "text_pair") if getattr(rec, n)]
    out += [(f"messages[{i}]", m["content"]) for i, m in enumerate(rec.messages or ())]
    for j, resp in enumerate(rec.responses or ()):
        if isinstance(resp, str):
            out.append((f"responses[{j}]", resp))
        else:
            out += [(f"responses[{j}][{i}]", m["content"]) for i, m in enumerate(resp)]
    return out


def _set_field(rec: Record, name: str, text: str) -> None:
    if name in ("text", "text_pair"):
        setattr(rec, name, text)
        return
    head, *index = name.replace("]", "").split("[")
    index = [int(i) for i in index]
    if head == "messages":
        rec.messages[index[0]] = {**rec.messages[index[0]], "content": text}
    elif len(index) == 1:
        rec.responses[index[0]] = text
    else:
        resp = rec.responses[index[0]]
        resp[index[1]] = {**resp[index[1]], "content": text}


# ----------------------------------------------------------------------------- the step

@dataclasses.dataclass
class Result:
    report: dict  # data_report.json's "privacy" section
    log: list[dict]  # one line per finding, no value in clear (privacy_log.jsonl)
    originals: list[dict]  # the values in clear with the text before them: memory only, unless
    # config.data.privacy.originals_path is set


class _Pseudonyms:
    """A value's stable token within one preparation: ``<PHONE_1>``, ``<PHONE_2>``, ... in
    order of first appearance; the number says nothing about the value."""

    def __init__(self):
        self._tokens: dict[tuple[str, str], str] = {}
        self._count: collections.Counter = collections.Counter()

    def __call__(self, entity: str, value: str) -> str:
        key = (entity, value)
        if key not in self._tokens:
            self._count[entity] += 1
            self._tokens[key] = f"<{ENTITIES[entity][1]}_{self._count[entity]}>"
        return self._tokens[key]


def replace(text: str, found: list[Finding], tokens: list[str]) -> str:
    """``text`` with each (non-overlapping, ordered) finding's span replaced by its token."""
    out, at = [], 0
    for f, token in zip(found, tokens):
        out += [text[at:f.start], token]
        at = f.end
    return "".join(out + [text[at:]])


def apply(c, splits: dict[str, list[Record]], logs: dict[str, clean.SplitLog]
          ) -> tuple[dict[str, list[Record]], Result | None]:
    """Run the step on every split (``c`` = ``config.data.privacy``); rows are changed in place,
    quarantined rows go to ``logs[split]``. Returns the splits and the result (None when off)."""
    if c.mode == "off":
        return splits, None
    if any(r.tokens for rows in splits.values() for r in rows):
        raise DataError("config.data.privacy does not handle task=token_classification (its words "
                        "carry tags that a replacement would shift); set config.data.privacy.mode='off'")
    start = time.perf_counter()
    detector = Detector(c)
    key = secrets.token_bytes(32)  # never stored: the log's hashes cannot be reversed
    pseudonym = _Pseudonyms()
    log, originals = [], []
    counts = {s: dict.fromkeys(detector.searched, 0) for s in splits}
    rows_hit = dict.fromkeys(splits, 0)
    for split, records in splits.items():
        hit = []
        for rec in records:
            reasons = collections.Counter()
            for name, text in fields(rec):
                found = detector.find(text)
                if not found:
                    continue
                tokens = []
                for f in found:
                    value = text[f.start:f.end]
                    digest = hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]
                    token = (f"<{ENTITIES[f.entity][1]}>" if c.mode == "redact" else
                             pseudonym(f.entity, value) if c.mode == "pseudonymise" else None)
                    tokens.append(token)
                    reasons[f.entity] += 1
                    counts[split][f.entity] += 1
                    line = {"split": split, "where": rec.where, "field": name, "entity": f.entity,
                            "start": f.start, "end": f.end, "score": f.score, "action": c.mode,
                            "replacement": token, "value_hmac": digest}
                    log.append(line)
                    originals.append({**line, "value": value,
                                      "prefix": text[max(0, f.start - _PREFIX_CHARS):f.start]})
                if c.mode != "quarantine":
                    _set_field(rec, name, replace(text, found, tokens))
            rows_hit[split] += bool(reasons)
            hit.append(", ".join(f"{e} {n}" for e, n in sorted(reasons.items())))
        if c.mode == "quarantine":
            splits[split] = logs[split].remove(
                records, [not h for h in hit], "privacy",
                [f"personal data ({h}); config.data.privacy.mode='quarantine'" for h in hit])
        else:
            logs[split].step("privacy", len(records), changed=rows_hit[split])
    report = {"mode": c.mode, "engine": detector.engine, "min_score": float(c.min_score),
              "searched": detector.searched, "not_searched": detector.not_searched,
              "findings": counts, "rows_with_findings": rows_hit, "log": LOG_FILE,
              "originals": c.originals_path or None, "seconds": round(time.perf_counter() - start, 3)}
    result = Result(report, log, originals)
    if c.originals_path:
        write_originals(c.originals_path, originals)
    return splits, result


def summary(section: dict) -> list[str]:
    """Printable lines of the report's privacy section."""
    lines = [f"  privacy ({section['mode']}, {section['seconds']} s): " + "; ".join(
        f"{split} " + ", ".join(f"{e} {n}" for e, n in counts.items())
        for split, counts in section["findings"].items())]
    lines += [f"  privacy: {e} {why}" for e, why in section["not_searched"].items()]
    return lines


def write_originals(path: str, originals: list[dict]) -> None:
    """The opt-in private file of values in clear (one JSON line each), replaced whole."""
    target = paths.as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    paths.write_text_atomic(target, "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in originals))
