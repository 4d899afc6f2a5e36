"""task=preference rows -> token pairs, checked against the tokenizer and its chat template."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_util import data_cfg, smollm_tokenizer, write

from ftjax.data import preference
from ftjax.data.records import DataError

ROWS = [
    {"prompt": "The film was", "chosen": " a delight.", "rejected": " a bore."},
    {"prompt": "The film was", "chosen": "", "rejected": " dull."},  # empty chosen
    {"prompt": "Plot:", "chosen": " thin", "rejected": "  thin "},  # identical after whitespace cleaning
    {"prompt": "The film was", "chosen": " a delight.", "rejected": " a bore."},  # duplicate of row 1
    {"prompt": "Acting:", "chosen": " superb and moving", "rejected": " wooden"},
]


def _cfg(path, **kw):
    return data_cfg(**{**dict(task="preference", train_path=path, text_field="prompt", seq_len=16), **kw})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    path = write(tmp_path_factory.mktemp("pref") / "train.jsonl", "\n".join(json.dumps(r) for r in ROWS))
    return preference.prepare(_cfg(path), smollm_tokenizer())


def test_pairs_hold_prompt_then_response_tokens(prepared):
    tok = smollm_tokenizer()
    pairs = prepared[0]["train"]
    assert pairs.input_ids.shape == (2, 2, 16) and pairs.where[1].endswith(":5")
    for i, row in enumerate([ROWS[0], ROWS[4]]):
        prompt = tok(row["prompt"])["input_ids"]
        for j, key in enumerate(("chosen", "rejected")):
            want = prompt + tok(row[key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            n = pairs.length[i, j]
            assert pairs.prompt_len[i, j] == len(prompt)
            np.testing.assert_array_equal(pairs.input_ids[i, j, :n], want)
            assert (pairs.input_ids[i, j, n:] == (tok.pad_token_id or tok.eos_token_id)).all()


def test_bad_pairs_are_quarantined_with_their_reason(prepared):
    _, report, quarantine = prepared
    reasons = {q["where"].rsplit(":", 1)[1]: q["reason"] for q in quarantine}
    assert reasons == {"2": "empty chosen response", "3": "chosen and rejected responses are identical",
                       "4": f"exact duplicate of {quarantine[2]['where'].rsplit(':', 1)[0]}:1"}
    assert report["quarantined"] == 3 and report["splits"]["train"]["pairs"] == 2
    assert [s["step"] for s in report["splits"]["train"]["steps"]] == ["read", "normalise", "pair", "dedup"]


def test_chat_pairs_use_the_template_and_share_the_prompt(tmp_path):
    tok = smollm_tokenizer()
    user = [{"role": "user", "content": "Review the film."}]
    rows = [{"chosen": user + [{"role": "assistant", "content": "Lovely."}],
             "rejected": user + [{"role": "assistant", "content": "Awful."}]}]
    path = write(tmp_path / "chat.jsonl", json.dumps(rows[0]))
    pairs = preference.prepare(_cfg(path, text_field="", seq_len=64), tok)[0]["train"]
    prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    for j, key in enumerate(("chosen", "rejected")):
        full = tok(tok.apply_chat_template(rows[0][key], tokenize=False), add_special_tokens=False)["input_ids"]
        np.testing.assert_array_equal(pairs.input_ids[0, j, :pairs.length[0, j]], full)
        assert pairs.prompt_len[0, j] == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert pairs.prompt_len[0, 0] == pairs.prompt_len[0, 1]


def test_long_pairs_cut_the_response_or_are_quarantined(tmp_path):
    tok = smollm_tokenizer()
    row = {"prompt": "Short.", "chosen": " one two three four five six seven eight nine ten", "rejected": " no"}
    path = write(tmp_path / "long.csv", "prompt,chosen,rejected\n" + ",".join(row.values()) + "\n")
    pairs, report, _ = preference.prepare(_cfg(path, seq_len=6), tok)
    assert pairs["train"].length[0, 0] == 6 and report["splits"]["train"]["tokens"]["truncated_pairs"] == 1
    with pytest.raises(DataError, match="every pair of the train split was removed"):
        preference.prepare(_cfg(path, seq_len=6, truncation="drop"), tok)


def test_batches_keep_pairs_together(prepared):
    pairs = prepared[0]["train"]
    first = next(preference.train_batches(pairs, 2, seed=0))
    assert first["input_ids"].shape == (2, 2, 16)
    assert sorted(first["length"].tolist()) == sorted(pairs.length.tolist())
