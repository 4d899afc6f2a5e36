"""Data problems that used to pass in silence or fail far from their cause: empty files, rows
truncated to seq_len, a single-class train split; and the cache as an epath folder."""

import json
import logging

import pytest
from etils import epath

from data_util import bert_tokenizer, data_cfg, write
from ftjax.data import prepare
from ftjax.data.records import DataError

# WordPiece tokens of each text with [CLS] and [SEP]: every letter / word here is one token.
_TRAIN = [("one", 3), ("a b c d e f", 8), ("a b c d e f g", 9), ("a b c d e f g h i j", 12), ("x", 3)]
_EVAL = [("a b c d e f g h", 10), ("y", 3)]


def _csv(path, rows, labels) -> str:
    return write(path, "text,label\n" + "".join(f"{t},{y}\n" for (t, _), y in zip(rows, labels)))


def test_report_counts_truncated_rows_and_tokens_per_split(tmp_path):
    cfg = data_cfg(task="classification", seq_len=8,
                   train_path=_csv(tmp_path / "train.csv", _TRAIN, [0, 1, 0, 1, 0]),
                   eval_path=_csv(tmp_path / "eval.csv", _EVAL, [0, 1]))
    tok = bert_tokenizer()
    assert [len(tok(t)["input_ids"]) for t, _ in _TRAIN + _EVAL] == [n for _, n in _TRAIN + _EVAL]
    _, directory = prepare.prepare_cached(cfg, tok, str(tmp_path / "cache"))
    report = json.loads((directory / "data_report.json").read_text())
    # train: 9 -> 8 cuts 1, 12 -> 8 cuts 4; eval: 10 -> 8 cuts 2
    assert report["splits"]["train"]["truncated"] == {"rows": 2, "tokens_cut": 5}
    assert report["splits"]["eval"]["truncated"] == {"rows": 1, "tokens_cut": 2}
    assert report["warnings"] == []
    assert "truncated 2 rows (5 tokens cut)" in prepare.summary(report)


def test_cache_directory_is_an_epath_and_its_key_is_stable(tmp_path):
    cfg = data_cfg(task="classification", train_path=_csv(tmp_path / "t.csv", _TRAIN, [0, 1, 0, 1, 0]))
    tok = bert_tokenizer()
    prepared, directory = prepare.prepare_cached(cfg, tok, str(tmp_path / "cache"))
    assert isinstance(directory, epath.Path) and directory.parent == epath.Path(tmp_path / "cache")
    assert sorted(p.name for p in directory.iterdir()) == ["data_report.json", "labels.json",
                                                           "quarantine.jsonl", "train.npz"]
    tok("a b c d", truncation=True, max_length=3)  # leaves truncation state in the backend
    again, same = prepare.prepare_cached(cfg, tok, epath.Path(tmp_path / "cache"))
    assert same == directory
    assert [e.ids.tolist() for e in again.examples["train"]] == [e.ids.tolist() for e in prepared.examples["train"]]


def test_builds_share_the_cache_until_a_source_file_changes(tmp_path, monkeypatch):
    from ftjax.data import pipeline

    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "home"))
    path = _csv(tmp_path / "t.csv", _TRAIN, [0, 1, 0, 1, 0])
    cfg, tok = data_cfg(task="classification", train_path=path), bert_tokenizer()
    assert prepare.cache_dir(cfg) == str(tmp_path / "home" / "data")
    calls = []
    real = prepare.prepare
    monkeypatch.setattr(prepare, "prepare", lambda *a: calls.append(a) or real(*a))
    first = pipeline.build(cfg, tok)
    cfg.cache_dir = str(tmp_path / "home" / "data")  # the default, spelled out: same key
    assert pipeline.build(cfg, tok).report == first.report and len(calls) == 1
    _csv(tmp_path / "t.csv", _TRAIN, [1, 1, 0, 1, 0])  # same size, new content
    assert pipeline.build(cfg, tok).report["splits"]["train"]["labels"] != first.report["splits"]["train"]["labels"]
    assert len(calls) == 2 and len(list((tmp_path / "home" / "data").iterdir())) == 2
    cfg.cache_dir = "none"
    assert prepare.cache_dir(cfg) is None
    pipeline.build(cfg, tok)
    assert len(calls) == 3 and len(list((tmp_path / "home" / "data").iterdir())) == 2


def test_single_class_train_split_warns_and_strict_raises(tmp_path, caplog):
    path = _csv(tmp_path / "train.csv", _TRAIN, ["pos"] * 5)
    expected = (f"{path}: every train row has the label 'pos' (a single class), so the model can only "
                f"learn to predict it; check the file and config.data.label_field")
    with caplog.at_level(logging.WARNING):
        prepared = prepare.prepare(data_cfg(task="classification", train_path=path), bert_tokenizer())
    assert prepared.report["warnings"] == [expected]
    assert expected in caplog.text
    assert "warning: " + expected in prepare.summary(prepared.report)
    with pytest.raises(DataError) as e:
        prepare.prepare(data_cfg(task="classification", train_path=path, strict=True), bert_tokenizer())
    assert str(e.value) == expected + " (an error because config.data.strict=True)"


def test_two_classes_do_not_warn(tmp_path):
    path = _csv(tmp_path / "train.csv", _TRAIN, ["pos", "neg", "pos", "pos", "pos"])
    report = prepare.prepare(data_cfg(task="classification", train_path=path, strict=True),
                             bert_tokenizer()).report
    assert report["warnings"] == [] and report["splits"]["train"]["labels"] == {"neg": 1, "pos": 4}


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("ext", ["jsonl", "csv", "tsv", "txt"])
def test_empty_file_names_itself(tmp_path, split, ext):
    task = "lm" if ext == "txt" else "classification"
    files = {"train": _csv(tmp_path / "full.csv", _TRAIN, [0, 1, 0, 1, 0]) if ext != "txt"
             else write(tmp_path / "full.txt", "some text\nmore text\n")}
    files[split] = write(tmp_path / f"empty.{ext}", "")
    cfg = data_cfg(task=task, train_path=files["train"], eval_path=files.get("eval", ""))
    with pytest.raises(DataError) as e:
        prepare.prepare(cfg, bert_tokenizer())
    assert str(e.value) == (f"{tmp_path / f'empty.{ext}'}: the {split} split has no rows (is the file "
                            f"empty?); check config.data.{split}_path")


def test_split_emptied_by_cleaning_names_file_and_steps(tmp_path):
    path = write(tmp_path / "blank.txt", "\n  \n\t\n")  # 3 lines, all blank
    with pytest.raises(DataError) as e:
        prepare.prepare(data_cfg(task="lm", train_path=path), bert_tokenizer())
    assert str(e.value) == (f"{path}: all 3 train rows were removed while preparing (removed by empty 3); "
                            f"see the quarantine file or relax config.data.clean")


def test_truncation_counts_for_lm_and_token_classification(tmp_path):
    # lm, seq_len 4, no EOS: [CLS] a..g [SEP] = 9 tokens -> chunks 4 + 4 + a 1-token tail (dropped);
    # "a b" = 4 tokens and "a b c d e f" = 8 tokens split evenly.
    lm = write(tmp_path / "lm.txt", "a b c d e f g\na b\na b c d e f\n")
    report = prepare.prepare(data_cfg(task="lm", train_path=lm, seq_len=4), bert_tokenizer()).report
    assert report["splits"]["train"]["truncated"] == {"rows": 1, "tokens_cut": 1}
    # token_classification, seq_len 4: 3 words -> 5 ids (cut 1), 1 word -> 3, 6 words -> 8 (cut 4)
    rows = [list("abc"), ["x"], list("abcdef")]
    tc = write(tmp_path / "tc.jsonl", "".join(json.dumps({"text": r, "label": ["O"] * len(r)}) + "\n"
                                              for r in rows))
    report = prepare.prepare(data_cfg(task="token_classification", train_path=tc, seq_len=4),
                             bert_tokenizer()).report
    assert report["splits"]["train"]["truncated"] == {"rows": 2, "tokens_cut": 5}
