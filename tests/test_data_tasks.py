"""Task formats: classification batches, NER alignment, text-to-text verbalisers, chat loss masks."""

import json

import numpy as np

from data_util import bert_tokenizer, data_cfg, smollm_tokenizer, write
from ftjax.data import pipeline


def test_classification_batches_use_buckets(tmp_path):
    lines = ["pos short one", "neg " + "very long text " * 30, "neg tiny", "pos also short"]
    train = write(tmp_path / "t.txt", "\n".join(lines))
    cfg = data_cfg(task="classification", format="label_text", train_path=train, eval_path=train,
                   seq_len=64, buckets=[16, 64], clean__leakage="off")
    pipe = pipeline.build(cfg, bert_tokenizer())
    assert pipe.info.num_labels == 2 and pipe.info.label_names == ["neg", "pos"]
    first, second = pipe.eval_batches(2)
    assert set(first) == {"input_ids", "segment_ids", "positions", "labels", "example_mask"}
    assert first["input_ids"].shape == (2, 64) and second["input_ids"].shape == (2, 16)
    np.testing.assert_array_equal(first["labels"], [1, 0])
    assert first["input_ids"][1, 63] == 102  # truncated on the right, [SEP] kept
    ids = bert_tokenizer()("tiny")["input_ids"]
    assert len(ids) == 3
    np.testing.assert_array_equal(second["input_ids"][0], ids + [0] * 13)
    np.testing.assert_array_equal(second["segment_ids"][0], [1, 1, 1] + [0] * 13)
    np.testing.assert_array_equal(second["positions"][0], [0, 1, 2] + [0] * 13)


def test_pair_classification(tmp_path):
    path = write(tmp_path / "p.jsonl", json.dumps({"a": "is it", "b": "yes it is", "y": "entail"}) + "\n")
    cfg = data_cfg(task="pair_classification", train_path=path, text_field="a", text_pair_field="b",
                   label_field="y", seq_len=16)
    batch = next(pipeline.build(cfg, bert_tokenizer()).train_iterator(1))
    tok = bert_tokenizer()
    want = [101] + tok("is it", add_special_tokens=False)["input_ids"] + [102] + \
        tok("yes it is", add_special_tokens=False)["input_ids"] + [102]
    np.testing.assert_array_equal(batch["input_ids"][0, :len(want)], want)


def test_ner_labels_go_to_the_first_sub_token(tmp_path):
    path = write(tmp_path / "n.conll", "Schwarzenegger NNP B-PER\nvisits VBZ O\nLlanfairpwll NNP B-LOC\n\n")
    cfg = data_cfg(task="token_classification", train_path=path, seq_len=32)
    pipe = pipeline.build(cfg, bert_tokenizer())
    assert pipe.info.label_names == ["B-LOC", "B-PER", "O"]
    batch = next(pipe.train_iterator(1))
    tok = bert_tokenizer()
    pieces = [tok(w, add_special_tokens=False)["input_ids"] for w in ["Schwarzenegger", "visits", "Llanfairpwll"]]
    assert len(pieces[0]) > 1 and len(pieces[2]) > 1  # the words really split into sub-tokens
    want = [-100]
    for p, tag in zip(pieces, [1, 2, 0]):
        want += [tag] + [-100] * (len(p) - 1)
    want += [-100]
    np.testing.assert_array_equal(batch["labels"][0, :len(want)], want)
    assert (batch["labels"][0, len(want):] == -100).all()
    np.testing.assert_array_equal(batch["input_ids"][0, :len(want)], [101] + sum(pieces, []) + [102])


def test_text_to_text_answer_mask_and_choices(tmp_path):
    tok = smollm_tokenizer()
    path = write(tmp_path / "s.txt", "1 a fine film\n0 a dull film\n")
    cfg = data_cfg(task="text_to_text", format="label_text", train_path=path, eval_path=path, seq_len=32,
                   verbalizers=["negative", "positive"], packing=False, clean__leakage="off")
    pipe = pipeline.build(cfg, tok)
    negative, positive = pipe.verbalizer_ids()
    assert negative == tok(" negative", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompt = tok("a fine film\nAnswer:")["input_ids"]
    (batch,) = pipe.eval_batches(2)
    np.testing.assert_array_equal(batch["labels"], [1, 0])
    n = len(prompt) + len(positive)
    np.testing.assert_array_equal(batch["input_ids"][0, :n], prompt + positive)
    want_mask = np.zeros(batch["loss_mask"].shape[1])
    want_mask[len(prompt) - 1:n - 1] = 1  # positions whose next token is an answer token
    np.testing.assert_array_equal(batch["loss_mask"][0], want_mask)
    np.testing.assert_array_equal(batch["choice_input_ids"][0, 0, :len(prompt) + len(negative)], prompt + negative)
    np.testing.assert_array_equal(batch["choice_loss_mask"].sum(-1), [[len(negative), len(positive)]] * 2)
    np.testing.assert_array_equal(batch["choice_mask"], [[1, 1], [1, 1]])
    train = next(pipe.train_iterator(2))
    assert "labels" not in train and set(train["loss_mask"].sum(-1)) == {len(positive), len(negative)}


def test_chat_loss_only_on_assistant_tokens(tmp_path):
    tok = smollm_tokenizer()
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]
    path = write(tmp_path / "c.jsonl", json.dumps({"messages": conv}) + "\n")
    cfg = data_cfg(task="chat", train_path=path, seq_len=64)
    batch = next(pipeline.build(cfg, tok).train_iterator(1))
    ids = batch["input_ids"][0]
    # By hand: the template renders a default system turn, then
    # <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n [Hello there<|im_end|>\n] ... [Ciao<|im_end|>\n]
    assistant = [tok.decode(ids[i]) for i in np.flatnonzero(batch["loss_mask"][0]) + 1]
    assert assistant == ["Hello", " there", "<|im_end|>", "\n", "C", "iao", "<|im_end|>", "\n"]
    assert tok.decode(ids[batch["segment_ids"][0] > 0]).startswith("<|im_start|>system\n")
