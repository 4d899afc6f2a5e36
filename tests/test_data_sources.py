"""Every source format on small hand-written files, and the message of every bad input."""

import json

import pytest

from data_util import bert_tokenizer, data_cfg, write
from ftjax.data import prepare, sources
from ftjax.data.records import DataError


def _read(path, **kw):
    return sources.read_split(data_cfg(train_path=str(path), **kw), "train")


def test_formats(tmp_path):
    rows = _read(write(tmp_path / "a.csv", 'text,label\n"hello, world",pos\nbye,neg\n'), task="classification")
    assert [(r.text, r.label, r.where.split(":")[-1]) for r in rows] == [("hello, world", "pos", "2"),
                                                                         ("bye", "neg", "3")]
    rows = _read(write(tmp_path / "b.tsv", 'pos\tsays "hi"\nneg\tno\n'), task="classification",
                 text_field="1", label_field="0")
    assert [(r.text, r.label) for r in rows] == [('says "hi"', "pos"), ("no", "neg")]
    rows = _read(write(tmp_path / "c.jsonl", '{"q": "a?", "p": "b", "y": 1}\n\n{"q": "c?", "p": "d", "y": 0}\n'),
                 task="pair_classification", text_field="q", text_pair_field="p", label_field="y")
    assert [(r.text, r.text_pair, r.label, r.where[-1]) for r in rows] == [("a?", "b", "1", "1"),
                                                                           ("c?", "d", "0", "3")]
    rows = _read(write(tmp_path / "d.json", json.dumps({"data": [{"text": "x", "label": "l"}]})),
                 task="classification")
    assert (rows[0].text, rows[0].label) == ("x", "l")
    rows = _read(write(tmp_path / "e.txt", "good movie@positive\nemail a@b.com@neutral\n"),
                 task="classification", format="text_label")
    assert [(r.text, r.label) for r in rows] == [("good movie", "positive"), ("email a@b.com", "neutral")]
    rows = _read(write(tmp_path / "f.conll", "-DOCSTART- -X- O\n\nEU NNP B-ORG\nrejects VBZ O\n\nPeter NNP B-PER\n"),
                 task="token_classification")
    assert [(r.tokens, r.tags) for r in rows] == [(["EU", "rejects"], ["B-ORG", "O"]), (["Peter"], ["B-PER"])]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), tmp_path / "t.parquet")
    rows = _read(tmp_path / "t.parquet", task="classification")
    assert [(r.text, r.label) for r in rows] == [("a", "0"), ("b", "1")]


def test_hf_dataset_from_a_local_folder(tmp_path):
    import datasets
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["great", "awful", "fine"], "label": [1, 0, 1]}, features),
        "validation": datasets.Dataset.from_dict({"sentence": ["ok"], "label": [1]}, features)})
    dd.save_to_disk(str(tmp_path / "hf"))
    cfg = data_cfg(task="classification", text_field="sentence", hf__name=str(tmp_path / "hf"))
    p = prepare.prepare(cfg, bert_tokenizer())
    assert p.labels == ["neg", "pos"] and p.report["splits"]["eval"]["labels"] == {"pos": 1}
    assert [e.label for e in p.examples["train"]] == [1, 0, 1]


def test_tfds_dataset_built_locally(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinySentiment(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(), "label": tfds.features.ClassLabel(names=["neg", "pos"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples([("good", 1), ("bad", 0), ("nice", 1)]),
                    "test": self._generate_examples([("meh", 0)])}

        def _generate_examples(self, rows):
            for i, (t, y) in enumerate(rows):
                yield i, {"text": t, "label": y}

    TinySentiment(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = data_cfg(task="classification", tfds__name="tiny_sentiment", tfds__data_dir=str(tmp_path))
    p = prepare.prepare(cfg, bert_tokenizer())
    assert sorted(p.report["splits"]["train"]["labels"].items()) == [("neg", 1), ("pos", 2)]
    assert p.report["splits"]["eval"]["rows"] == 1


@pytest.mark.parametrize("name,content,kw,pattern", [
    ("a.txt", "0 fine\nnolabel\n", dict(format="label_text"), r"a.txt:2: expected 'LABEL TEXT'"),
    ("b.txt", "fine@pos\nno separator\n", dict(format="text_label"), r"b.txt:2: expected 'TEXT@LABEL'"),
    ("c.tsv", "text\tlabel\nok\t1\ntoo\tmany\tfields\n", {}, r"c.tsv:3: expected 2 tab-separated fields"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b" "label": 1}\n', {}, r"d.jsonl:2: invalid JSON"),
    ("e.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 1}\n', {}, r"e.jsonl:2: fields \['text'\] missing"),
    ("f.csv", "sentence,label\na,1\n", {}, r"f.csv:1: column 'text' not found"),
    ("g.dat", "x\n", {}, r"g.dat: cannot tell the format"),
])
def test_bad_input_messages(tmp_path, name, content, kw, pattern):
    with pytest.raises(DataError, match=pattern):
        _read(write(tmp_path / name, content), task="classification", **kw)


def test_missing_file_and_wrong_encoding(tmp_path):
    with pytest.raises(DataError, match=r"nope.txt: file not found"):
        _read(tmp_path / "nope.txt")
    path = write(tmp_path / "latin.txt", "1 ok\n0 caf\u00e9 au lait\n", encoding="iso-8859-1")
    with pytest.raises(DataError, match=r"latin.txt:2: not valid UTF-8 .*--config.data.encoding=iso-8859-1"):
        _read(path, format="label_text", task="classification")
    assert _read(path, format="label_text", task="classification", encoding="iso-8859-1")[1].text == "caf\u00e9 au lait"


def test_unknown_labels_error_lists_lines_or_quarantine(tmp_path):
    train = write(tmp_path / "train.txt", "pos a\nneg b\nposs c\nneu d\n")
    cfg = data_cfg(task="classification", format="label_text", train_path=train, labels=["neg", "pos"])
    with pytest.raises(DataError) as e:
        prepare.prepare(cfg, bert_tokenizer())
    assert "2 rows have labels outside" in str(e.value)
    assert "train.txt:3: ['poss']" in str(e.value) and "train.txt:4: ['neu']" in str(e.value)
    cfg.unknown_labels = "quarantine"
    p = prepare.prepare(cfg, bert_tokenizer())
    assert [q["where"].split(":")[-1] for q in p.quarantine] == ["3", "4"]
    assert p.quarantine[0]["reason"] == "unknown label ['poss']"
    assert [e.label for e in p.examples["train"]] == [1, 0]
    assert p.report["splits"]["train"]["labels"] == {"neg": 1, "pos": 1}
