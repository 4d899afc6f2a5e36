"""Each cleaning step on crafted rows, the leakage check on a planted overlap, k-shot and mixtures."""

import numpy as np
import pytest

from data_util import bert_tokenizer, data_cfg, write
from ftjax.data import clean, mixture, pipeline, prepare
from ftjax.data.records import Record


def _clean(texts, **flags):
    c = data_cfg(**{f"clean__{k}": v for k, v in flags.items()}).clean
    log = clean.SplitLog()
    out = clean.clean_split([Record(f"f:{i + 1}", text=t) for i, t in enumerate(texts)], c, log)
    return [r.text for r in out], log


def test_normalisation_steps():
    texts, log = _clean(["\uff21\uff22 caf\u00e9\u00a0 x", "tab\there\x07  end ", "a &amp; b"], html_unescape=True,
                        lowercase=True)
    assert texts == ["ab café x", "tab here end", "a & b"]
    assert log.steps[0] == {"step": "normalise", "rows": 3, "changed": 3}
    texts, _ = _clean(["A &amp; B"], nfkc=False, control_chars=False, whitespace=False)
    assert texts == ["A &amp; B"]


def test_empty_length_and_exact_duplicates_are_quarantined_with_reasons():
    texts, log = _clean(["keep me", "   ", "x", "keep me", "a much longer row that is too long"],
                        min_chars=2, max_chars=20)
    assert texts == ["keep me"]
    assert [(s["step"], s["rows"]) for s in log.steps] == [("normalise", 5), ("empty", 4), ("length", 2), ("dedup", 1)]
    reasons = {q["where"]: q["reason"] for q in log.quarantine}
    assert reasons == {"f:2": "empty", "f:3": "length 1 chars outside [2, 20]",
                       "f:5": "length 34 chars outside [2, 20]", "f:4": "exact duplicate of f:1"}


def test_near_duplicates():
    base = "the quick brown fox jumps over the lazy dog near the river bank on a sunny day in june"
    texts, log = _clean([base, base.replace("june", "july"), "an entirely different sentence about cats",
                         base + " again"], near_dedup=True, near_dedup_threshold=0.7)
    assert texts == [base, "an entirely different sentence about cats"]
    assert {q["where"] for q in log.quarantine} == {"f:2", "f:4"}
    assert all(q["reason"] == "near duplicate of f:1" for q in log.quarantine)


def test_leakage_is_reported_and_removed(tmp_path):
    train = write(tmp_path / "train.txt", "pos a great film\nneg a dull film\npos fine\n")
    dev = write(tmp_path / "dev.txt", "pos A  Great film\nneg something new\nneg a dull film\n")
    cfg = data_cfg(task="classification", format="label_text", train_path=train, eval_path=dev)
    report = prepare.prepare(cfg, bert_tokenizer()).report
    assert report["leakage"] == {"eval_rows_in_train": 2, "removed": False,
                                 "examples": [f"{dev}:1", f"{dev}:3"]}
    cfg.clean.leakage = "remove"
    p = prepare.prepare(cfg, bert_tokenizer())
    assert p.report["splits"]["eval"]["rows"] == 1
    assert [q["reason"] for q in p.quarantine] == ["also in train", "also in train"]


def test_kshot_is_stratified_seeded_and_draws_differ(tmp_path):
    lines = [f"{'pos' if i % 3 else 'neg'} row {i}" for i in range(60)]
    train = write(tmp_path / "train.txt", "\n".join(lines))
    def draw(d):
        cfg = data_cfg(task="classification", format="label_text", train_path=train, kshot__k=4, kshot__draw=d)
        p = prepare.prepare(cfg, bert_tokenizer())
        assert p.report["splits"]["train"]["labels"] == {"neg": 4, "pos": 4}
        return [bert_tokenizer().decode(e.ids, skip_special_tokens=True) for e in p.examples["train"]]
    assert draw(0) == draw(0) and draw(0) != draw(1)
    cfg = data_cfg(task="classification", format="label_text", train_path=train, kshot__k=30)
    with pytest.raises(ValueError, match="label 'neg' has only 20 train rows"):
        prepare.prepare(cfg, bert_tokenizer())


def test_mixture_weights():
    mix = data_cfg().mixture
    names = ["a", "b"]
    np.testing.assert_allclose(mixture.weights([900, 100], mix, names), [0.9, 0.1])
    mix.weighting, mix.temperature = "temperature", 2.0
    np.testing.assert_allclose(mixture.weights([900, 100], mix, names), [30 / 40, 10 / 40])
    mix.weighting = "equal"
    np.testing.assert_allclose(mixture.weights([900, 100], mix, names), [0.5, 0.5])
    mix.weighting, mix.weights = "explicit", {"a": 1.0, "b": 3.0}
    np.testing.assert_allclose(mixture.weights([900, 100], mix, names), [0.25, 0.75])


def test_mixture_sampling_frequencies_and_task_ids(tmp_path):
    a = write(tmp_path / "a.txt", "\n".join(f"pos alpha {i}" if i % 2 else f"neg alpha {i}" for i in range(90)))
    b = write(tmp_path / "b.txt", "\n".join(f"yes beta {i}" if i % 2 else f"no beta {i}" for i in range(10)))
    cfg = data_cfg(task="classification", format="label_text", seq_len=16)
    cfg.mixture.tasks = {"a": {"train_path": a}, "b": {"train_path": b}}
    cfg.mixture.weighting = "temperature"  # p = (90**.5, 10**.5) / sum = (0.75, 0.25)
    pipe = pipeline.build(cfg, bert_tokenizer())
    assert pipe.info.task_names == ["a", "b"] and pipe.info.num_tasks == 2
    assert pipe.info.label_names == ["a:neg", "a:pos", "b:no", "b:yes"]
    it = pipe.train_iterator(32)
    batches = [next(it) for _ in range(50)]
    task = np.concatenate([x["task_id"] for x in batches])
    labels = np.concatenate([x["labels"] for x in batches])
    n, p = len(task), 0.25
    assert abs(task.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)  # 4 sigma
    assert set(labels[task == 0]) == {0, 1} and set(labels[task == 1]) == {2, 3}
    word = bert_tokenizer().convert_tokens_to_ids("beta")
    first_words = np.concatenate([x["input_ids"][:, 1] for x in batches])
    assert ((first_words == word) == (task == 1)).all()
