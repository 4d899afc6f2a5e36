"""Evaluation beyond plain classification: verbaliser scoring, CoNLL entities vs seqeval,
bits per byte, and exact match / token F1 of generated answers (hand-made cases)."""

import jax
import numpy as np
import pytest
from flax import nnx
from scipy.special import log_softmax
from seqeval import metrics as seqeval_metrics
from sklearn import metrics as skm

from ftjax import sharding
from ftjax.eval.answers import answer_metrics, exact_match, normalize_answer, token_f1
from ftjax.eval.byte_counts import token_byte_lengths
from ftjax.eval.entities import entities, entity_metrics
from ftjax.eval.loop import Evaluator


class Bigram(nnx.Module):
    """logits[b, t] = table[input_ids[b, t]]: log-likelihoods are easy to compute by hand."""

    def __init__(self, vocab: int, seed: int = 0):
        self.table = nnx.Param(jax.random.normal(jax.random.key(seed), (vocab, vocab)) * 2.0)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        return self.table[...][input_ids]


class EchoTagger(nnx.Module):
    """Token classifier whose prediction at each position is the input id (one-hot logits)."""

    def __init__(self, num_labels: int):
        self.num_labels = num_labels
        self.bias = nnx.Param(jax.numpy.zeros((num_labels,)))

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        return jax.nn.one_hot(input_ids, self.num_labels) * 10.0 + self.bias[...]


def _mesh(n: int):
    return sharding.make_mesh(dict(data=1, fsdp=n, tensor=1), jax.devices()[:n])


# ----------------------------------------------------------------------------- entities

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-LOC", "S-MISC", "I-MISC"]


def _random_sentences(rng, n, max_len=12):
    return [[TAGS[i] for i in rng.integers(0, len(TAGS), rng.integers(1, max_len))] for _ in range(n)]


def test_entity_spans_match_seqeval_on_ill_formed_tags():
    from seqeval.metrics.sequence_labeling import get_entities
    rng = np.random.default_rng(0)
    for tags in _random_sentences(rng, 300):
        assert sorted(entities(tags)) == sorted(get_entities(tags)), tags


def test_entity_metrics_match_seqeval():
    rng = np.random.default_rng(1)
    true = _random_sentences(rng, 200)
    pred = [[t if rng.random() < 0.7 else TAGS[rng.integers(len(TAGS))] for t in s] for s in true]
    m = entity_metrics(true, pred)
    report = seqeval_metrics.classification_report(true, pred, output_dict=True, zero_division=0)
    assert m["entity_f1_micro"] == pytest.approx(seqeval_metrics.f1_score(true, pred))
    assert m["entity_precision_micro"] == pytest.approx(seqeval_metrics.precision_score(true, pred))
    assert m["entity_recall_micro"] == pytest.approx(seqeval_metrics.recall_score(true, pred))
    for avg in ("macro", "weighted"):
        for name in ("precision", "recall", "f1"):
            assert m[f"entity_{name}_{avg}"] == pytest.approx(report[f"{avg} avg"][
                "f1-score" if name == "f1" else name])
    for row in m["entity_per_type"]:
        assert row["f1"] == pytest.approx(report[row["label"]]["f1-score"])
        assert row["support"] == report[row["label"]]["support"]


def test_token_evaluator_entities_and_confusion():
    """The jitted token path (with padding rows and ignored sub-tokens) vs seqeval and sklearn."""
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    rng = np.random.default_rng(2)
    n, t, bs = 21, 10, 8
    true = rng.integers(0, 5, (n, t))
    pred = np.where(rng.random((n, t)) < 0.75, true, rng.integers(0, 5, (n, t)))
    lengths = rng.integers(3, t + 1, n)
    labels = np.where(np.arange(t) < lengths[:, None], true, -100)
    labels[:, 1] = -100  # a continuation sub-token: ignored everywhere
    batches = []
    for s in range(0, 24, bs):
        idx = np.arange(s, s + bs)
        real = idx < n
        safe = np.where(real, idx, 0)
        seg = np.where(np.arange(t) < lengths[safe][:, None], 1, 0) * real[:, None]
        batches.append(dict(input_ids=pred[safe].astype(np.int32), segment_ids=seg.astype(np.int32),
                            positions=np.tile(np.arange(t, dtype=np.int32), (bs, 1)),
                            labels=np.where(real[:, None], labels[safe], -100).astype(np.int32),
                            example_mask=real.astype(np.float32)))
    graphdef, params, rest = nnx.split(EchoTagger(5), nnx.Param, ...)
    m = Evaluator(graphdef, _mesh(8), kind="token", num_labels=5, label_names=names).run(params, rest, batches)
    keep = labels != -100
    true_seqs = [[names[i] for i in true[r][keep[r]]] for r in range(n)]
    pred_seqs = [[names[i] for i in pred[r][keep[r]]] for r in range(n)]
    assert m["entity_f1_micro"] == pytest.approx(seqeval_metrics.f1_score(true_seqs, pred_seqs))
    assert m["entity_precision_micro"] == pytest.approx(seqeval_metrics.precision_score(true_seqs, pred_seqs))
    np.testing.assert_array_equal(m["confusion_matrix"],
                                  skm.confusion_matrix(true[keep], pred[keep], labels=range(5)))


# ----------------------------------------------------------------------------- verbalisers

def _choice_batch(prompts, options, labels, allowed, length):
    """Choice arrays built directly from the definition (prompt + option, loss on the option)."""
    b, c = len(prompts), len(options)
    ids = np.zeros((b, c, length), np.int32)
    tgt, seg = np.zeros_like(ids), np.zeros_like(ids)
    mask = np.zeros((b, c, length), np.float32)
    for i, p in enumerate(prompts):
        for j, o in enumerate(options):
            seq = list(p) + list(o)
            ids[i, j, :len(seq)], seg[i, j, :len(seq)] = seq, 1
            tgt[i, j, :len(seq) - 1] = seq[1:]
            mask[i, j, len(p) - 1:len(seq) - 1] = 1
    pos = (np.arange(length) * np.ones_like(ids)) * seg
    return dict(choice_input_ids=ids, choice_targets=tgt, choice_loss_mask=mask, choice_segment_ids=seg,
                choice_positions=pos.astype(np.int32), choice_mask=np.asarray(allowed, np.float32),
                labels=np.asarray(labels, np.int32), example_mask=np.ones(b, np.float32))


def test_verbaliser_scoring_by_hand():
    vocab = 12
    model = Bigram(vocab, seed=3)
    logp = log_softmax(np.asarray(model.table[...]), axis=-1)
    rng = np.random.default_rng(3)
    options = [[5, 6, 1], [7, 1], [8, 9, 10, 1]]  # multi-token verbalisers, EOS = 1
    prompts = [rng.integers(2, vocab, rng.integers(2, 6)).tolist() for _ in range(16)]
    labels = rng.integers(0, 3, 16)
    allowed = np.ones((16, 3))
    allowed[:4, 2] = 0  # rows whose task does not own label 2
    ll = np.array([[sum(logp[a, b] for a, b in zip(p[len(p) - 1:] + o[:-1], o)) for o in options] for p in prompts])
    bias = np.array([0.0, 1.5, -0.5])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ev = Evaluator(graphdef, _mesh(4), kind="lm", num_labels=3, choices=True)
    batch = _choice_batch(prompts, options, labels, allowed, length=12)
    np.testing.assert_allclose(ev.scores(params, rest, batch), ll, rtol=1e-5)
    m = ev.run(params, rest, [batch], option_bias=bias)
    for got, b in ((m, 0.0), (m["calibrated"], bias)):
        preds = np.argmax(np.where(allowed > 0, ll - b, -np.inf), -1)
        np.testing.assert_array_equal(got["confusion_matrix"], skm.confusion_matrix(labels, preds, labels=range(3)))
    assert not np.array_equal(m["confusion_matrix"], m["calibrated"]["confusion_matrix"])
    gold = ll[np.arange(16), labels]
    tokens = np.array([len(options[y]) for y in labels])
    assert m["loss"] == pytest.approx(-gold.sum() / tokens.sum(), rel=1e-5)


# ----------------------------------------------------------------------------- bits per byte

def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["naïve café über straße", "the quick brown fox — jumps", "日本語のテキスト"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_token_byte_lengths_sum_to_utf8_bytes():
    tok = _byte_level_tokenizer()
    lengths = token_byte_lengths(tok)
    for text in ["naïve café", "über straße — quick 日本語", "fox"]:
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert lengths[ids].sum() == len(text.encode("utf-8"))


def test_lm_bits_per_byte_by_hand():
    tok = _byte_level_tokenizer()
    vocab = len(tok)
    model = Bigram(vocab, seed=4)
    logp = log_softmax(np.asarray(model.table[...]), axis=-1)
    texts = ["naïve café über", "日本語 fox"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    length = 16
    batch = {k: np.zeros((2, length), np.int32) for k in ("input_ids", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = np.zeros((2, length), np.float32)
    nll = 0.0
    for i, r in enumerate(rows):
        n = len(r)
        batch["input_ids"][i, :n], batch["segment_ids"][i, :n], batch["positions"][i, :n] = r, 1, np.arange(n)
        batch["targets"][i, :n - 1], batch["loss_mask"][i, :n - 1] = r[1:], 1
        nll -= sum(logp[a, b] for a, b in zip(r[:-1], r[1:]))
    batch["example_mask"] = np.ones(2, np.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    m = Evaluator(graphdef, _mesh(2), kind="lm", tokenizer=tok).run(params, rest, [batch])
    # Targets are every token but the first of each text: bytes = all bytes - first token's bytes.
    first = sum(len(tok.convert_ids_to_tokens(r[0])) for r in rows)
    num_bytes = sum(len(t.encode()) for t in texts) - first
    assert m["loss"] == pytest.approx(nll / sum(len(r) - 1 for r in rows), rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(nll / num_bytes / np.log(2), rel=1e-5)


# ----------------------------------------------------------------------------- answers

def test_squad_normalisation_and_scores_by_hand():
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert exact_match("the Eiffel Tower.", ["Eiffel tower", "Paris"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel tower"]) == 0.0
    # pred tokens {eiffel, tower, paris}, gold {eiffel, tower}: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("Eiffel Tower, Paris", ["the Eiffel Tower"]) == pytest.approx(0.8)
    assert token_f1("Paris", ["London", "paris!"]) == 1.0  # best reference counts
    assert token_f1("a an the", ["the"]) == 1.0  # both normalise to empty
    assert token_f1("cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # overlap counts multiplicity: 1 of 2
    m = answer_metrics(["Paris", "1,000", "blue whale"], [["paris"], "1000", ["the whale"]])
    assert m["exact_match"] == pytest.approx(2 / 3)
    assert m["token_f1"] == pytest.approx((1 + 1 + 2 / 3) / 3)
