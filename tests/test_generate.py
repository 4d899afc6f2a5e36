"""KV-cache generation: cache == no-cache logits per family, the decode loop vs a naive greedy
loop, sampling distributions vs numpy, stop strings, buckets
(SmolLM2-135M's greedy batch vs transformers' generate: test_gguf.py, beside its GGUF load)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax.generate import Generator, Request, SamplingParams, decode
from ftjax.generate.decode import cache_dims
from ftjax.generate.sampling import SamplingArrays, sample
from ftjax.generate.text import TextStream
from ftjax.models.kv_cache import KVCache
from ftjax.models.loading import from_pretrained
from test_gguf import tiny_bpe_tokenizer
from test_llama_parity import one_device_mesh

# preset -> overrides; windows shorter than the sequence so sliding attention really bites.
TINY = {"tiny-llama": dict(vocab_size=128),
        "mistral-window": dict(vocab_size=128, sliding_window=4, model_type="mistral"),
        "tiny-gpt2": dict(vocab_size=128),
        "tiny-gemma2": dict(vocab_size=128, sliding_window=4)}


@functools.cache
def tiny_model(name: str, scan: bool = True):
    preset = "tiny-llama" if name == "mistral-window" else name
    model, _ = from_pretrained(preset, mesh=one_device_mesh(), scan_layers=scan, **TINY[name])
    return model


def left_padded(lengths: list[int], vocab: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for row, n in enumerate(lengths):
        ids[row, t - n:], mask[row, t - n:] = rng.integers(3, vocab, n), 1
    return ids, mask


@jax.jit
def _cached_step(graphdef, state, ids, positions, segments, cache):
    model = nnx.merge(graphdef, state)
    h, cache = model.model(ids, positions=positions, segment_ids=segments, cache=cache)
    return model.logits(h), cache


@pytest.mark.parametrize("name,scan", [(n, True) for n in sorted(TINY)] + [("tiny-llama", False)])
def test_cached_logits_equal_full_forward(name, scan):
    """Prefill 4 tokens, then feed the rest one at a time: same logits as one full forward."""
    model = tiny_model(name, scan)
    ids, mask = left_padded([10, 7])
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    full = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(positions),
                            segment_ids=jnp.asarray(mask)))
    layers, heads, head_dim = cache_dims(model.model.cfg)
    cache = KVCache.zeros(layers, 2, 16, heads, head_dim)
    graphdef, state = nnx.split(model)
    got = []
    for lo, hi in [(0, 4)] + [(i, i + 1) for i in range(4, 10)]:
        logits, cache = _cached_step(graphdef, state, ids[:, lo:hi], positions[:, lo:hi],
                                     mask[:, lo:hi], cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    keep = mask.astype(bool)
    assert np.abs(full[keep]).max() > 0.1
    np.testing.assert_allclose(got[keep], full[keep], atol=2e-5, rtol=1e-5)


def naive_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Reference: rerun the whole sequence without a cache for every new token (fixed shape)."""
    forward = jax.jit(lambda ids, mask: model(ids, mask))
    buf = np.zeros((1, len(prompt) + steps), np.int32)
    buf[0, :len(prompt)] = prompt
    for i in range(len(prompt), buf.shape[1]):
        logits = forward(buf, (np.arange(buf.shape[1]) < i)[None].astype(np.int32))
        buf[0, i] = int(jnp.argmax(logits[0, i - 1]))
    return buf[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma2"])
def test_decode_loop_matches_naive_greedy(name):
    model = tiny_model(name)
    ids, mask = left_padded([9, 3, 6], seed=1)
    prompts = [ids[r, mask[r] == 1].tolist() for r in range(3)]
    graphdef, state = nnx.split(model)
    max_new = np.array([8, 5, 8], np.int32)
    params = SamplingArrays.stack([SamplingParams()] * 3)
    tokens, lengths = decode(graphdef, state, ids, mask, max_new, params,
                             np.full((3, 1), -1, np.int32), cache_len=20)
    assert lengths.tolist() == [8, 5, 8]
    for row, prompt in enumerate(prompts):
        assert np.asarray(tokens)[row, :lengths[row]].tolist() == naive_greedy(model, prompt, int(max_new[row]))
        assert (np.asarray(tokens)[row, lengths[row]:] == -1).all()


def test_stop_token_ends_a_row_and_is_kept_last():
    model = tiny_model("tiny-llama")
    prompt = left_padded([5])[0][0].tolist()
    ref = naive_greedy(model, prompt, 6)
    tokenizer = tiny_bpe_tokenizer(128)
    gen = Generator(model, tokenizer)
    out = gen.generate([Request(prompt, SamplingParams(max_new_tokens=6, stop_token_ids=(ref[2],))),
                        Request(prompt, SamplingParams(max_new_tokens=6, stop_token_ids=()))])
    stop_at = ref.index(ref[2])
    assert out[0].tokens == ref[:stop_at] and out[0].finish_reason == "stop"
    assert out[1].tokens == ref and out[1].finish_reason == "length"


def test_sampling_frequencies_match_numpy():
    """Temperature, top-k and top-p against the renormalised distributions computed in numpy."""
    logits = np.array([2.0, 1.5, 1.0, 0.0, -1.0], np.float32)
    n = 6000
    cases = [(0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8)]
    for temperature, top_k, top_p in cases:
        p = np.exp(logits / temperature)
        p /= p.sum()
        if top_k:
            p[top_k:] = 0
        if top_p < 1:
            p[np.cumsum(p) - p >= top_p] = 0
        p /= p.sum()
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        arrays = SamplingArrays.stack([params] * n)._replace(seed=np.arange(n, dtype=np.uint32))
        draws = np.asarray(jax.jit(sample)(jnp.tile(logits, (n, 1)), jnp.int32(3), arrays))
        freq = np.bincount(draws, minlength=5) / n
        np.testing.assert_allclose(freq, p, atol=0.025), (temperature, top_k, top_p)


def test_sampling_greedy_rows_and_seeds():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    arrays = SamplingArrays.stack([SamplingParams(), SamplingParams(temperature=1.0, top_k=1),
                                   SamplingParams(temperature=5.0, seed=7),
                                   SamplingParams(temperature=5.0, seed=7)])
    out = np.asarray(sample(logits, jnp.int32(0), arrays))
    best = np.asarray(jnp.argmax(logits, -1))
    assert out[0] == best[0] and out[1] == best[1]  # greedy row; top-k 1 is greedy too
    alone = sample(logits[2:3], jnp.int32(0), SamplingArrays.stack([SamplingParams(temperature=5.0, seed=7)]))
    assert int(alone[0]) == out[2]  # a seeded row does not depend on its batch companions
    again = np.asarray(sample(logits, jnp.int32(0), arrays))
    assert out.tolist() == again.tolist()  # seeded: reproducible


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(top_k=-2), dict(max_new_tokens=0), dict(stop=("",))])
def test_sampling_params_reject_nonsense(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_text_stream_cuts_stop_strings_and_streams_the_same_text():
    tokenizer = tiny_bpe_tokenizer(280)
    ids = tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]
    stream = TextStream(tokenizer, stop=(" jumps",))
    pieces = [stream.push(i) for i in ids]
    assert stream.stopped and stream.text == "the quick brown fox"
    assert "".join(pieces) == stream.text
    free = TextStream(tokenizer, stop=("lazy cat",))
    pieces = [free.push(i) for i in tokenizer("the quick brown fox jumps over the lazy")["input_ids"]]
    assert not free.stopped and "".join(pieces) == "the quick brown fox jumps over the "  # held
    assert free.finish() == "lazy"


def test_text_stream_decodes_a_window_per_token_linear_in_length():
    """Streaming 300 tokens decodes O(1) ids per token (not the whole text every time) and the
    pieces add up to transformers' decode of all the ids."""
    tokenizer = tiny_bpe_tokenizer(280)
    ids = tokenizer("the quick brown fox jumps over the lazy dog " * 40)["input_ids"][:300]
    decoded = []

    class Counting:
        def decode(self, part, **kw):
            decoded.append(len(part))
            return tokenizer.decode(part, **kw)

    stream = TextStream(Counting())
    pieces = [stream.push(i) for i in ids]
    pushed = sum(decoded)  # re-decoding everything each time: ~45,000
    assert "".join(pieces) + stream.finish() == tokenizer.decode(ids, skip_special_tokens=True)
    assert pushed < 8 * len(ids), pushed


def test_generator_compiles_once_per_bucket_and_streams():
    model = tiny_model("tiny-llama")
    gen = Generator(model, tiny_bpe_tokenizer(128))
    before = decode._cache_size()
    gen.generate([Request([5, 6, 7], SamplingParams(max_new_tokens=4))])
    gen.generate([Request([5, 6, 7, 8, 9, 10], SamplingParams(max_new_tokens=9, temperature=0.8))])
    assert decode._cache_size() == before + 1  # same (batch, prompt, cache) bucket
    chunks: list[str] = []
    out = gen.generate([Request([5, 6, 7], SamplingParams(max_new_tokens=8), on_text=chunks.append)])
    assert "".join(chunks) == out[0].text


def test_cancelled_row_ends_while_its_batch_goes_on():
    model = tiny_model("tiny-llama")
    gen = Generator(model, tiny_bpe_tokenizer(128))
    params = SamplingParams(max_new_tokens=6, stop_token_ids=())
    gone = Request([5, 6, 7], params, on_text=lambda _: None)
    gone.cancelled.set()
    out = gen.generate([gone, Request([8, 9], params)])
    assert len(out[0].tokens) == 1 and len(out[1].tokens) == 6


def test_generator_rejects_prompts_longer_than_the_context():
    model = tiny_model("tiny-llama")
    gen = Generator(model, tiny_bpe_tokenizer(128))
    with pytest.raises(ValueError, match="exceeds the context of 512"):
        gen.generate([Request([5] * 500, SamplingParams(max_new_tokens=20))])
