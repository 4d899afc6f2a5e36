"""GGUF: SmolLM2-135M (Q4_1) vs transformers' own GGUF loader (logits, and greedy generation of a
left-padded batch), and the F32/F16/BF16 export round trip."""

from __future__ import annotations

import resource

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ftjax.export import save_gguf
from ftjax.generate import Generator, Request, SamplingParams
from ftjax.models import gguf_io
from ftjax.models.assets import smollm2_gguf_path
from ftjax.models.loading import from_pretrained
from test_llama_parity import (ftjax_logits, hf_config, make_hf, one_device_mesh, padded_batch,
                               torch_logits)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def smollm2():
    """One ftjax load and one transformers load of the real GGUF, shared by the checks below."""
    path = smollm2_gguf_path()
    before = _peak_rss_mb()
    model, tokenizer = from_pretrained(path, mesh=one_device_mesh())
    rss = (before, _peak_rss_mb())
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short poem about the sea."}],
        add_generation_prompt=True)["input_ids"]
    return model, tokenizer, ref, np.array([prompt]), rss


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf(smollm2, record_property):
    model, _, ref, ids, (rss_before, rss_after) = smollm2
    record_property("peak_rss_mb_before_load", rss_before)
    record_property("peak_rss_mb_after_load", rss_after)
    mask = np.ones_like(ids)
    expected = torch_logits(ref, ids, mask)
    got = ftjax_logits(model, ids, mask)
    assert np.abs(expected).max() > 5  # real logits, not a degenerate model
    np.testing.assert_allclose(got, expected, atol=5e-4, rtol=0)  # measured 1.2e-4


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_transformers_generate(smollm2):
    """ftjax's Generator (KV cache, left-padded batch) on the GGUF load, token for token against
    transformers' generate on its own load of the same file."""
    model, tokenizer, ref, _, _ = smollm2
    gen = Generator(model, tokenizer)
    prompts = [gen.chat_prompt([{"role": "user", "content": "What is 2+2?"}]),
               gen.encode("The capital of France is")]
    assert len(prompts[0]) > len(prompts[1]) + 20  # left padding really happens
    steps = 12
    ours = gen.generate([Request(p, SamplingParams(max_new_tokens=steps)) for p in prompts])
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    with torch.no_grad():
        theirs = ref.generate(**batch, max_new_tokens=steps, do_sample=False)
    eos = tokenizer.eos_token_id
    for got, row in zip(ours, theirs[:, batch["input_ids"].shape[1]:].tolist()):
        expected = row[:row.index(eos)] if eos in row else row
        assert got.tokens == expected, (got.text, tokenizer.decode(expected))
        assert got.finish_reason == ("stop" if eos in row else "length")
    assert ours[0].text.strip().endswith("4.") and ours[0].finish_reason == "stop"  # EOS mid-batch


def tiny_bpe_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences (offline, deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 +
                            ["fine-tuning language models with jax"] * 20, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("variant,dtype,atol", [("llama3-plain", "f32", 1e-4),
                                                ("qwen2", "f32", 1e-4), ("llama2", "f16", 2e-2),
                                                ("llama2", "bf16", 1.5e-1)])
def test_gguf_export_round_trip(variant, dtype, atol, tmp_path):
    tokenizer = tiny_bpe_tokenizer(280)
    name = "llama3" if variant == "llama3-plain" else variant
    extra = dict(rope_parameters=dict(rope_type="default", rope_theta=500000.0)) \
        if variant == "llama3-plain" else {}
    ref_model = make_hf(transformers.AutoModelForCausalLM.from_config,
                        hf_config(name, vocab_size=280, **extra), tmp_path / "hf")
    ids, mask = padded_batch(vocab=280)
    keep = mask.astype(bool)
    ref = torch_logits(ref_model, ids, mask)[keep]
    model, _ = from_pretrained(tmp_path / "hf", mesh=one_device_mesh())
    # The tiny tokenizer splits like GPT-2 (its byte-level regex), so llama.cpp's "gpt-2" is its name.
    out = save_gguf(model, tokenizer, tmp_path / "m.gguf", dtype, pre_tokenizer="gpt-2")

    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == gguf_io.ARCH_OF_MODEL_TYPE[
        model.model.cfg.model_type].name
    assert len(reader.tensors) == len(ref_model.state_dict()) - (
        1 if ref_model.config.tie_word_embeddings else 0)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    np.testing.assert_allclose(torch_logits(loaded, ids, mask)[keep], ref, atol=atol, rtol=0)
    again, tok_again = from_pretrained(out, mesh=one_device_mesh())
    np.testing.assert_allclose(ftjax_logits(again, ids, mask)[keep], ref, atol=atol, rtol=0)
    text = "the lazy fox fine-tunes jax"
    assert tok_again(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_unsupported_gguf_architecture_is_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'mamba'.*supported.*'llama'"):
        from_pretrained(tmp_path / "x.gguf", mesh=one_device_mesh())
