"""In-context scoring on a cached demonstrations prefix (ftjax.eval.prefix_scores): per-option
log-likelihoods vs transformers (PyTorch) on each full concatenated sequence, for tiny random
Llama, Mistral (a sliding window that cuts into the prefix) and GPT-2 (learned positions); and
evaluate_incontext's metrics with the prefix cache on and off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from ftjax.eval import prefix_scores
from ftjax.eval.incontext import evaluate_incontext
from ftjax.models.loading import from_pretrained
from test_incontext import _config, tiny  # noqa: F401  (tiny: the module fixture)
from test_llama_parity import hf_config, make_hf, one_device_mesh, randomize

ATOL = 1e-4  # float32 on both sides; summed log-likelihoods are O(10)
CONTEXT = 21  # tokens: 20 cached + the last one, which starts every row
PROMPTS = [3, 7, 0, 5, 4]  # query lengths (an empty one too); sorted and batched 2 at a time
OPTIONS = [[5, 2], [9], [11, 12, 2]]


def _hf_model(family: str, path) -> torch.nn.Module:
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      pad_token_id=0)
        torch.manual_seed(0)
        model = randomize(transformers.GPT2LMHeadModel(cfg))
        model.save_pretrained(path)
        return model
    variant, extra = {"llama": ("smollm2", {}), "mistral": ("mistral", dict(sliding_window=12))}[family]
    return make_hf(transformers.AutoModelForCausalLM.from_config, hf_config(variant, **extra), path)


def _reference(model: torch.nn.Module, context, prompt, option) -> float:
    """Summed log p(option | context + prompt) from one unpadded full sequence."""
    seq = np.concatenate([context, prompt, option])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(seq[None])).logits[0].double()
    logp = torch.log_softmax(logits, -1).numpy()
    n = len(context) + len(prompt)
    return float(sum(logp[n - 1 + i, t] for i, t in enumerate(option)))


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_prefix_scores_match_transformers_full_sequence(family, tmp_path):
    ref = _hf_model(family, tmp_path)
    model, _ = from_pretrained(tmp_path, mesh=one_device_mesh())
    assert prefix_scores.supported(model)
    rng = np.random.default_rng(1)
    context = rng.integers(3, 96, CONTEXT).astype(np.int32)
    prompts = [rng.integers(3, 96, n).astype(np.int32) for n in PROMPTS]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    scorer = prefix_scores.PrefixScorer(graphdef, one_device_mesh(), batch_size=2, pad_id=0)
    encoded = scorer.encode(params, rest, context, prefix_scores.prefix_slots(CONTEXT))
    assert encoded.prefix.k.shape[1] == 128  # padded slots (segment 0) must not count
    done = []
    got = scorer.scores(params, rest, encoded, prompts, OPTIONS, on_batch=done.append)
    want = np.array([[_reference(ref, context, p, o) for o in OPTIONS] for p in prompts])
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert done == [2, 4, 5]
    assert np.ptp(want, axis=1).min() > 0.1  # the options really differ


def test_full_and_prefix_paths_agree_and_report_progress(tiny, capsys):  # noqa: F811
    c, tok, mesh, model = tiny
    c = _config(k=2, draws=2, max_examples=10)
    c.incontext.content_free = ["N/A", "", "[MASK]"]
    results = {}
    for on in (True, False):
        c.incontext.prefix_cache = on
        results[on] = evaluate_incontext(model, tok, c, mesh)
        assert results[on]["prefix_cache"] is on
    out = capsys.readouterr().out
    assert "in-context draw 2/2: 13/13 prompts" in out
    for new, old in zip(results[True]["draws"], results[False]["draws"]):
        np.testing.assert_allclose(new["p_content_free"], old["p_content_free"], rtol=1e-5)
        for m_new, m_old in ((new["metrics"], old["metrics"]),
                             (new["metrics"]["calibrated"], old["metrics"]["calibrated"])):
            np.testing.assert_array_equal(m_new["confusion_matrix"], m_old["confusion_matrix"])
        assert new["metrics"]["loss"] == pytest.approx(old["metrics"]["loss"], rel=1e-5)
    assert results[True]["summary"] == pytest.approx(results[False]["summary"])


def test_models_without_a_usable_cache_take_the_full_path():
    bert, _ = from_pretrained("tiny-bert", mesh=one_device_mesh())
    assert not prefix_scores.supported(bert)
