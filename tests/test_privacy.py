"""data.privacy: planted personal data found at hand-written spans, near misses left alone, the
three modes, the log and report, the cache key, real phone numbers in SMS spam, and a leakage
check that tells a model that memorised a secret from one trained on the redacted text."""

import collections
import functools
import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from data_util import bert_tokenizer, data_cfg, write
from ftjax.data import clean, prepare, privacy
from ftjax.data.records import DataError, Record
from ftjax.eval import leakage
from ftjax.generate import Generator
from ftjax.models.loading import from_pretrained
from ftjax.train.lm_loss import cross_entropy
from test_gguf import tiny_bpe_tokenizer
from test_llama_parity import one_device_mesh

SMS = "/work/shared/data/sms_spam/sms.tsv"

# (text, [(entity, value), ...]): every value planted by hand; its span is where it sits.
PLANTED = [
    ("Mail alice.smith@example.com or bob+news@mail.co.uk, not user@localhost.",
     [("email", "alice.smith@example.com"), ("email", "bob+news@mail.co.uk")]),
    ("Call +1 650-253-0000, +44 20 7946 0958 or +49 30 12345678 today.",
     [("phone", "+1 650-253-0000"), ("phone", "+44 20 7946 0958"), ("phone", "+49 30 12345678")]),
    ("In the US dial (650) 253-0000 after six.", [("phone", "(650) 253-0000")]),
    ("Card 4111 1111 1111 1111, backup 5500-0000-0000-0004 and amex 378282246310005.",
     [("credit_card", "4111 1111 1111 1111"), ("credit_card", "5500-0000-0000-0004"),
      ("credit_card", "378282246310005")]),
    ("Pay to DE89 3704 0044 0532 0130 00 or GB82WEST12345698765432 please.",
     [("iban", "DE89 3704 0044 0532 0130 00"), ("iban", "GB82WEST12345698765432")]),
    ("Server 192.168.1.20, resolver 8.8.8.8 and host 2001:db8::ff00:42:8329 answered.",
     [("ip", "192.168.1.20"), ("ip", "8.8.8.8"), ("ip", "2001:db8::ff00:42:8329")]),
    # near misses: a version, a date, a time, an order number, a price, a card failing Luhn,
    # an IBAN with bad check digits, an impossible IPv4 and a host-only address
    ("Release 2.10.3 shipped on 2024-03-15 at 12:30:45; order #12345 cost $1,299.99.", []),
    ("Not a card 4111 1111 1111 1112, not an IBAN DE00 3704 0044 0532 0130 00, not an IP 999.10.1.1.", []),
    ("Alice Smith met the team in Paris.", []),  # a name: only found with a NER pipeline
]
PERSON_ROW = len(PLANTED) - 1


def expected(rows=PLANTED):
    """(row index, entity, start, end) of every planted value."""
    out = []
    for i, (text, values) in enumerate(rows):
        for entity, value in values:
            assert text.count(value) == 1, value
            start = text.index(value)
            out.append((i, entity, start, start + len(value)))
    return out


def privacy_cfg(**kw):
    return data_cfg(**{f"privacy__{k}": v for k, v in kw.items()}).privacy


def records(rows=PLANTED):
    return [Record(where=f"planted:{i + 1}", text=t) for i, (t, _) in enumerate(rows)]


def run(rows=PLANTED, **kw):
    logs = {"train": clean.SplitLog()}
    splits, result = privacy.apply(privacy_cfg(**kw), {"train": records(rows)}, logs)
    return splits["train"], result, logs["train"]


def found(result):
    return sorted((int(line["where"].split(":")[1]) - 1, line["entity"], line["start"], line["end"])
                  for line in result.log)


def test_planted_values_found_at_their_spans_and_near_misses_not():
    rows, result, _ = run(mode="redact")
    assert found(result) == sorted(expected())
    counts = collections.Counter(e for _, e, _, _ in expected())
    assert result.report["findings"]["train"] == {e: counts.get(e, 0) for e in
                                                  ("email", "phone", "credit_card", "iban", "ip")}
    assert result.report["searched"] == ["email", "phone", "credit_card", "iban", "ip"]
    assert "NOT searched" in result.report["not_searched"]["person"]
    assert rows[0].text == "Mail <EMAIL> or <EMAIL>, not user@localhost."
    assert rows[4].text == "Pay to <IBAN> or <IBAN> please."
    assert [r.text for r in rows[6:]] == [t for t, _ in PLANTED[6:]]  # untouched


def test_entities_and_min_score_select_findings():
    _, result, _ = run(mode="redact", entities=["ip"])
    assert found(result) == sorted(x for x in expected() if x[1] == "ip")
    # phone numbers score 0.4 (no context words on the no_op engine), cards/IBANs/e-mails 1.0
    _, result, _ = run(mode="redact", min_score=0.5)
    assert {e for _, e, _, _ in found(result)} == {"email", "credit_card", "iban", "ip"}


def test_pseudonymise_is_consistent_and_quarantine_removes_rows():
    rows = [("from alice.smith@example.com", [("email", "alice.smith@example.com")]),
            ("from bob+news@mail.co.uk", [("email", "bob+news@mail.co.uk")]),
            ("again alice.smith@example.com", [("email", "alice.smith@example.com")]),
            ("nothing here", [])]
    out, result, _ = run(rows, mode="pseudonymise")
    assert [r.text for r in out] == ["from <EMAIL_1>", "from <EMAIL_2>", "again <EMAIL_1>", "nothing here"]
    assert [line["replacement"] for line in result.log] == ["<EMAIL_1>", "<EMAIL_2>", "<EMAIL_1>"]
    hashes = [line["value_hmac"] for line in result.log]
    assert hashes[0] == hashes[2] != hashes[1]
    out, result, log = run(rows, mode="quarantine")
    assert [r.text for r in out] == ["nothing here"]
    assert [q["where"] for q in log.quarantine] == ["planted:1", "planted:2", "planted:3"]
    assert log.quarantine[0]["reason"].startswith("personal data (email 1)")
    assert {line["action"] for line in result.log} == {"quarantine"}


def test_person_names_need_a_spacy_pipeline(tmp_path):
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": "PERSON", "pattern": "Alice Smith"}])
    nlp.to_disk(tmp_path / "ner")
    rows, result, _ = run(mode="redact", entities=["person", "email"], ner_model=str(tmp_path / "ner"))
    assert found(result) == sorted([(PERSON_ROW, "person", 0, 11)] +
                                   [x for x in expected() if x[1] == "email"])
    assert rows[PERSON_ROW].text == "<PERSON> met the team in Paris."
    assert result.report["not_searched"] == {}


@pytest.mark.parametrize("kw,message", [
    (dict(mode="redacted"), "config.data.privacy.mode='redacted'"),
    (dict(entities=["emails"]), "config.data.privacy.entities=['emails']"),
    (dict(min_score=2.0), "config.data.privacy.min_score=2.0"),
    (dict(mode="redact", ner_model="/no/such/pipeline"), "config.data.privacy.ner_model='/no/such/pipeline'"),
])
def test_bad_settings_are_one_clear_error(kw, message):
    with pytest.raises(DataError) as e:
        privacy.check(privacy_cfg(**kw))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_prepare_writes_report_and_log_without_values_and_keys_the_cache(tmp_path):
    lines = "".join(json.dumps({"text": t, "label": str(i % 2)}) + "\n" for i, (t, _) in enumerate(PLANTED))
    path = write(tmp_path / "pii.jsonl", lines)
    originals = tmp_path / "private" / "originals.jsonl"
    cfg = data_cfg(task="classification", train_path=path, privacy__mode="redact",
                   privacy__originals_path=str(originals), clean__dedup=False)
    tok = bert_tokenizer()
    prepared, directory = prepare.prepare_cached(cfg, tok, tmp_path / "cache")
    report = json.loads((directory / "data_report.json").read_text())
    assert report["privacy"]["findings"]["train"]["phone"] == 4
    assert [s["step"] for s in report["splits"]["train"]["steps"]][-1] == "privacy"
    log = [json.loads(x) for x in (directory / "privacy_log.jsonl").read_text().splitlines()]
    assert sorted((int(x["where"].rsplit(":", 1)[1]) - 1, x["entity"], x["start"], x["end"]) for x in log) \
        == sorted(expected())
    values = [v for _, vs in PLANTED for _, v in vs]
    stored = "".join(p.read_bytes().decode("utf-8", "replace") for p in directory.iterdir()
                     if p.suffix != ".npz")
    decoded = [leakage._alnum(tok.decode(e.ids)) for e in prepared.examples["train"]]
    for v in values:  # no value in clear in the cache (report, log, quarantine) or the tokens
        assert v not in stored and not any(leakage._alnum(v) in d for d in decoded), v
    assert "< email >" in tok.decode(prepared.examples["train"][0].ids)
    private = [json.loads(x) for x in originals.read_text().splitlines()]
    assert sorted(p["value"] for p in private) == sorted(values)
    assert private[0]["prefix"] == "Mail "
    keys = {prepare.cache_key(cfg, tok)}
    for change in (dict(privacy__mode="pseudonymise"), dict(privacy__entities=["email"]),
                   dict(privacy__min_score=0.6), dict(privacy__mode="off")):
        keys.add(prepare.cache_key(data_cfg(task="classification", train_path=path, clean__dedup=False,
                                            **{"privacy__mode": "redact", **change}), tok))
    assert len(keys) == 5


# Rows of the SMS Spam Collection (file line numbers) that hold UK phone numbers, read by hand.
SMS_PHONES = {9: ["09061701461"], 10: ["08002986030"], 43: ["07732584351", "08000930705"],
              94: ["0800 169 6031"], 608: ["07946746291", "07880867867"]}


def test_sms_spam_phone_numbers():
    with open(SMS, encoding="utf-8") as f:
        rows = [Record(where=f"sms.tsv:{n}", text=line.split("\t", 1)[1].strip())
                for n, line in enumerate(f, 1) if n <= 1000]
    logs = {"train": clean.SplitLog()}
    texts = {r.where: r.text for r in rows}
    _, result = privacy.apply(privacy_cfg(mode="redact", entities=["phone"]), {"train": rows}, logs)
    by_row = collections.defaultdict(list)
    for line in result.log:
        by_row[int(line["where"].split(":")[1])].append(texts[line["where"]][line["start"]:line["end"]])
    for n, numbers in SMS_PHONES.items():
        assert by_row[n] == numbers, n
    # 79 bare 11-digit 0... numbers stand in the first 1000 rows (checked by hand)
    assert result.report["findings"]["train"]["phone"] >= 75


# ----------------------------------------------------------------------------- leakage check

SECRET_ROW = "my card number is 4111 1111 1111 1111 thanks"


@functools.partial(jax.jit, static_argnums=(0, 5))
def _fit(graphdef, params, rest, ids, mask, steps):
    """``steps`` Adam steps on next-token loss over ``ids`` where ``mask``, in one compiled loop."""
    tx = optax.adam(1e-2)

    def loss(p):
        nll = cross_entropy(nnx.merge(graphdef, p, rest)(ids)[:, :-1], ids[:, 1:])
        return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()

    def body(_, carry):
        p, state = carry
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        return optax.apply_updates(p, updates), state

    params, _ = jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))
    return params, loss(params)


def _memorised(texts: list[str], tok, steps: int = 150, length: int = 32) -> list[Generator]:
    """One tiny random Llama per text, each trained from the same init on its one line (padded
    to ``length``, so all share one compile) until it knows it by heart."""
    model, _ = from_pretrained("tiny-llama", mesh=one_device_mesh(), vocab_size=len(tok))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    out = []
    for text in texts:
        row = tok(text)["input_ids"] + [tok.eos_token_id]
        ids = np.asarray([row + [tok.pad_token_id] * (length - len(row))], np.int32)
        trained, last = _fit(graphdef, params, rest, ids, (ids != tok.pad_token_id).astype(np.float32), steps)
        assert float(last) < 0.05
        out.append(Generator(nnx.merge(graphdef, trained, rest), tok))
    return out


def test_leakage_check_tells_memorised_from_redacted():
    tok = tiny_bpe_tokenizer(280)
    rows, result, _ = run([(SECRET_ROW, [])], mode="redact", entities=["credit_card"])
    assert rows[0].text == "my card number is <CREDIT_CARD> thanks"
    probes = result.originals
    raw_model, redacted_model = _memorised([SECRET_ROW, rows[0].text], tok)
    leaky = leakage.check(raw_model, probes)
    clean_ = leakage.check(redacted_model, probes)
    assert (leaky["probes"], leaky["reproduced"]) == (1, 1)
    assert (clean_["probes"], clean_["reproduced"]) == (1, 0)
    assert leaky["reproduced_rows"][0]["entity"] == "credit_card"
    assert "4111" not in json.dumps(leaky)
