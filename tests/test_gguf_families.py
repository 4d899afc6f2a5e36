"""GGUF export of every decoder family llama.cpp runs, read back by independent readers.

A tiny random transformers model per family goes through ftjax (``from_pretrained`` of its HF
folder, then ``ftjax.export.save_gguf``); the file is read back with transformers' GGUF loader
(``from_pretrained(..., gguf_file=...)``, its own name mapping and dequantisation) and must give
the original model's logits: exactly in F32 (measured max |diff| 0.0), within the stated bound
per quantised type. Gemma 1 has no transformers GGUF loader: its tensors are read with the
``gguf`` reader, mapped by the ``gguf`` package's name table and the ``1 + w`` norm shift undone.
The tokenizer transformers rebuilds from the file must give the same ids on a probe text with
contractions, numbers, whitespace runs and non-ASCII.

The tiny configs stay inside what transformers' GGUF loader reads back: it ignores Qwen3's
``key_length`` (so head_dim is its default 128), GPT-2's ``context_length`` for ``wpe`` (so
n_positions is 1024) and Gemma 2/3's softcaps and query scale (so those are the defaults).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ftjax.export import save_gguf
from ftjax.models.gguf_io import quants
from ftjax.models.loading import from_pretrained
from test_llama_parity import one_device_mesh, padded_batch, randomize, torch_logits

V = 320
PROBE = ("I'm sure it's 3.14159, isn't it? We've   got 1234567 reasons;\n\n\tthey'll say 'no'. "
         "Naïve café — 東京 🦙 ok    end")
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**BASE, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**BASE, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**BASE, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**{**BASE, "head_dim": 128}),
    "gemma": lambda: transformers.GemmaConfig(**BASE),
    "gemma2": lambda: transformers.Gemma2Config(**{**BASE, "head_dim": 256}, sliding_window=4),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**{**BASE, "head_dim": 256},
                                                         sliding_window=4),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4,
                                            bos_token_id=1, eos_token_id=2),
}
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
        "gemma2": "gemma2", "gemma3_text": "gemma3", "gpt2": "gpt2"}
# transformers rebuilds byte-level BPE tokenizers from these architectures' files (Gemma's
# converter expects SentencePiece pieces and scores).
BPE_READERS = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's split, so llama.cpp's "gpt-2") trained on probe-like text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V - 20, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([PROBE, "it's isn't we've they'll 123 3.14 café naïve"] * 20, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")


def _unit_scale(model: torch.nn.Module) -> torch.nn.Module:
    """Weights of std 1/sqrt(fan_in) (embeddings 1, norms 1 +- 0.1): activations keep their scale,
    so a weight error shows in the logits at its own size instead of being amplified."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else
                    noise if "embed" in name or p.ndim == 1 else noise / p.shape[-1] ** 0.5)
    return model.eval()


def _export(config, tokenizer, folder, dtype: str, init=randomize):
    torch.manual_seed(0)
    ref = init(transformers.AutoModelForCausalLM.from_config(config))
    ref.save_pretrained(folder)
    model, _ = from_pretrained(folder, mesh=one_device_mesh())
    out = save_gguf(model, tokenizer, folder / f"m-{dtype}.gguf", dtype, pre_tokenizer="gpt-2")
    return ref, out


def _read_with_gguf_reader(path, ref) -> torch.nn.Module:
    """Gemma 1: dequantised tensors, renamed by gguf's TensorNameMap, ``1 + w`` undone."""
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        [int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA, ref.config.num_hidden_layers)
    state = {}
    for name in ref.state_dict():
        if name != "lm_head.weight":  # tied
            x = tensors[names.get_name(name, try_suffixes=(".weight", ".bias"))]
            state[name] = torch.tensor(x - 1.0 if name.endswith("norm.weight") else x)
    fresh = type(ref)(ref.config).eval()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])
    fresh.tie_weights()
    return fresh


def _logits(ref, out, folder):
    ids, mask = padded_batch(vocab=V)
    keep = mask.astype(bool)
    if ref.config.model_type == "gemma":
        loaded = _read_with_gguf_reader(out, ref)
    else:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), gguf_file=out.name, dtype=torch.float32).eval()
    return torch_logits(loaded, ids, mask)[keep], torch_logits(ref, ids, mask)[keep]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_f32_export_reads_back_exactly(family, tokenizer, tmp_path):
    ref, out = _export(FAMILIES[family](), tokenizer, tmp_path, "f32")
    reader = gguf.GGUFReader(str(out))
    arch = ARCH[family]
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields[f"{arch}.block_count"].contents() == 2
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    got, want = _logits(ref, out, tmp_path)
    assert np.abs(want).max() > 0.5  # real logits, not a degenerate model
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    if family in BPE_READERS:
        back = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
        assert back(PROBE)["input_ids"] == tokenizer(PROBE)["input_ids"]
        assert len(tokenizer(PROBE)["input_ids"]) < 0.7 * len(PROBE.encode())  # merges mattered


# Rows of 256 so Q4_K blocks apply everywhere (token_embd, q/k/v/o, gate/up/down).
Q_CONFIG = dict(BASE, hidden_size=256, intermediate_size=256, head_dim=64)


# Bound on max |logit diff| / max |logit| (measured: 5.4e-4, 4.4e-3, 1.4e-2, 0.18, 0.19).
@pytest.mark.parametrize("dtype,bound", [("f16", 1e-3), ("bf16", 1e-2), ("q8_0", 3e-2),
                                         ("q4_0", 0.3), ("q4_k", 0.3)])
def test_quantised_llama_export_logits(dtype, bound, tokenizer, tmp_path):
    ref, out = _export(transformers.LlamaConfig(**Q_CONFIG), tokenizer, tmp_path, dtype, _unit_scale)
    target = quants.EXPORT_DTYPES[dtype][0]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.ffn_down.weight"] == types["token_embd.weight"] == target
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    got, want = _logits(ref, out, tmp_path)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < err < bound, err


def test_q4_k_blocks_dequantise_with_the_gguf_package():
    x = np.random.default_rng(0).normal(size=(3, 512)).astype(np.float32)
    x[1, :32] += 5.0  # one sub-block far from the others: its own scale and minimum
    back = gguf.quants.dequantize(quants.quantize_q4_k(x), gguf.GGMLQuantizationType.Q4_K)
    sub = x.reshape(-1, 32)
    step = (sub.max(-1) - np.minimum(sub.min(-1), 0)) / 15  # one 4-bit step per sub-block
    err = np.abs(back.reshape(-1, 32) - sub).max(-1)
    assert (err <= 0.75 * step + 1e-6).all(), (err / step).max()
