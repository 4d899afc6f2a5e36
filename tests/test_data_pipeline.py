"""Packing, batch shapes, resumable and per-process iteration, packed == unpacked loss."""

import json
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from data_util import bert_tokenizer, data_cfg, write
from ftjax.data import pipeline
from ftjax.data.encode import Example
from ftjax.data.packing import make_batch, to_rows
from ftjax.models import llama


def _ex(*ids):
    return Example(np.asarray(ids, np.int32), weights=np.ones(len(ids), np.float32))


def test_packing_by_hand():
    rows = to_rows([_ex(10, 11, 12), _ex(20, 21), _ex(30, 31, 32, 33)], seq_len=6, lm=True, pack=True)
    batch = make_batch(rows, np.asarray([0, 1, -1]), 8, pad_id=7, keys=())
    np.testing.assert_array_equal(batch["input_ids"], [[10, 11, 12, 20, 21, 7, 7, 7],
                                                       [30, 31, 32, 33, 7, 7, 7, 7],
                                                       [7] * 8])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2, 2, 0, 0, 0],
                                                         [1, 1, 1, 1, 0, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(batch["targets"][0], [11, 12, 0, 21, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["loss_mask"][0], [1, 1, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["example_mask"], [1, 1, 0])


def _lm_pipe(tmp_path, lines, seed=0, **kw):
    path = write(tmp_path / "docs.txt", "\n".join(lines) + "\n")
    cfg = data_cfg(task="lm", train_path=path, eval_path=path, seq_len=32, clean__leakage="off", **kw)
    return pipeline.build(cfg, bert_tokenizer(), seed=seed)


DOCS = [f"document number {i} says {' '.join(['word'] * (i % 7))} done" for i in range(60)]


def test_lm_batches_shapes_and_content(tmp_path):
    pipe = _lm_pipe(tmp_path, DOCS)
    assert pipe.info.task == "lm" and pipe.info.pad_id == 0 and pipe.has_eval
    batch = next(pipe.train_iterator(4))
    assert set(batch) == {"input_ids", "segment_ids", "positions", "targets", "loss_mask", "example_mask"}
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32 and batch["example_mask"].shape == (4,)
    # Every segment starts with [CLS]=101 at position 0 and ends with [SEP]=102 (no EOS in BERT).
    ids, seg, pos = batch["input_ids"], batch["segment_ids"], batch["positions"]
    np.testing.assert_array_equal(ids[pos == 0][seg[pos == 0] > 0], 101)
    # Decoding one segment gives back one of the documents.
    first = ids[0][seg[0] == 1]
    assert bert_tokenizer().decode(first, skip_special_tokens=True) in DOCS


def test_eval_pass_is_complete_and_padded(tmp_path):
    pipe = _lm_pipe(tmp_path, DOCS, packing=False)
    batches = list(pipe.eval_batches(16))
    assert len(batches) == 4  # 60 documents, one per row
    np.testing.assert_array_equal(batches[-1]["example_mask"], [1] * 12 + [0] * 4)
    assert (batches[-1]["segment_ids"][12:] == 0).all()
    assert sum(b["loss_mask"].sum() for b in batches) == sum(
        len(bert_tokenizer()(d)["input_ids"]) - 1 for d in DOCS)


def _stream(it, n):
    return [next(it) for _ in range(n)]


def test_resume_gives_the_uninterrupted_stream(tmp_path):
    pipe = _lm_pipe(tmp_path, DOCS, packing=False)
    straight = _stream(pipe.train_iterator(8), 20)  # 160 rows: crosses two epoch boundaries
    it = pipe.train_iterator(8)
    _stream(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    fresh = _lm_pipe(tmp_path, DOCS, packing=False).train_iterator(8)
    fresh.set_state(state)
    resumed = _stream(fresh, 13)
    for a, b in zip(straight[7:], resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # Each epoch visits every document once; different seeds give different orders.
    numbers = {bert_tokenizer().convert_tokens_to_ids(str(i)): i for i in range(60)}
    epoch = [numbers[t] for t in np.concatenate([b["input_ids"][:, 3] for b in straight[:8]])[:60]]
    assert sorted(epoch) == list(range(60))
    other_seed = _stream(_lm_pipe(tmp_path, DOCS, seed=1, packing=False).train_iterator(8), 8)
    other = [numbers[t] for t in np.concatenate([b["input_ids"][:, 3] for b in other_seed])[:60]]
    assert sorted(other) == list(range(60)) and other != epoch


def test_processes_get_disjoint_slices_of_the_global_batch(tmp_path):
    path = write(tmp_path / "docs.txt", "\n".join(DOCS))
    cfg = data_cfg(task="lm", train_path=path, seq_len=32, packing=False)
    whole = _stream(pipeline.build(cfg, bert_tokenizer()).train_iterator(8), 3)
    parts = [_stream(pipeline.build(cfg, bert_tokenizer(), process_index=p, process_count=4).train_iterator(8), 3)
             for p in range(4)]
    for step in range(3):
        for k in whole[step]:
            np.testing.assert_array_equal(np.concatenate([parts[p][step][k] for p in range(4)]), whole[step][k])
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        pipeline.build(cfg, bert_tokenizer(), process_count=3).train_iterator(8)


def test_packed_and_unpacked_give_the_same_per_example_loss(tmp_path):
    lines = DOCS[:12]
    packed = next(iter(_lm_pipe(tmp_path, lines, packing=True).eval_batches(12)))
    single = next(iter(_lm_pipe(tmp_path, lines, packing=False).eval_batches(12)))
    assert packed["segment_ids"].max() > 1  # several documents share a row
    cfg = llama.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4, num_kv_heads=2, scan_layers=False)
    model = llama.build(cfg, "causal_lm", 0, nnx.Rngs(0))

    def per_token(b):
        logits = model(jnp.asarray(b["input_ids"]), positions=jnp.asarray(b["positions"]),
                       segment_ids=jnp.asarray(b["segment_ids"]))
        return np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(b["targets"])))

    def losses(b, nll):  # (row, segment) -> summed loss, in document order
        out = []
        for r in range(len(b["input_ids"])):
            for s in range(1, b["segment_ids"][r].max() + 1):
                m = (b["segment_ids"][r] == s) * b["loss_mask"][r]
                out.append(float((nll[r] * m).sum()))
        return np.asarray(out)

    got, want = losses(packed, per_token(packed)), losses(single, per_token(single))
    assert len(got) == len(want) == 12
    np.testing.assert_allclose(got, want, rtol=2e-5)
