"""Llama-family parity with transformers (PyTorch reference): logits, heads, a gradient, meshes.

Each variant is a tiny random transformers model whose every weight (norms and biases included)
is randomised, saved with ``save_pretrained``, loaded with ftjax and compared on a padded batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from ftjax import sharding
from ftjax.models import registry
from ftjax.models.loading import from_pretrained
from ftjax.models.saving import save_pretrained

ATOL = 1e-4
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, max_position_embeddings=64)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16, rope_theta=500000.0)

# name -> (transformers model_type, config overrides)
VARIANTS = {
    "llama2": ("llama", dict(num_key_value_heads=4)),  # GQA ratio 1 (MHA), untied
    "llama3": ("llama", dict(num_key_value_heads=1, rope_parameters=LLAMA3_ROPE,
                             tie_word_embeddings=True)),  # GQA 4:1, llama3 rope, tied
    "smollm2": ("llama", dict(num_attention_heads=8, hidden_size=48, num_key_value_heads=2,
                              tie_word_embeddings=True,
                              rope_parameters=dict(rope_type="default", rope_theta=100000.0))),
    "mistral": ("mistral", dict(sliding_window=3)),  # window smaller than the sequence
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),  # q/k/v biases
    "qwen3": ("qwen3", dict(head_dim=16, tie_word_embeddings=False)),  # q/k norm, head_dim != D/N
}


def hf_config(variant: str, **extra) -> transformers.PretrainedConfig:
    model_type, overrides = VARIANTS[variant]
    return transformers.AutoConfig.for_model(model_type, **{**BASE, **overrides, **extra})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every weight a non-trivial value (HF inits norms to 1 and biases to 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return model.eval()


def make_hf(cls, cfg, path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomize(cls(cfg))
    model.save_pretrained(path)
    return model


def padded_batch(vocab: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three rows of 9: full, right-padded, left-padded (pad id 0 never occurs as a real token)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, :2] = 0
    return np.where(mask == 1, ids, 0), mask


def one_device_mesh():
    return sharding.make_mesh({}, devices=jax.devices()[:1])


def torch_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def ftjax_logits(model, ids, mask) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_causal_lm_logits_match_transformers(variant, tmp_path):
    ref_model = make_hf(transformers.AutoModelForCausalLM.from_config, hf_config(variant), tmp_path)
    ids, mask = padded_batch()
    ref = torch_logits(ref_model, ids, mask)
    model, _ = from_pretrained(tmp_path, mesh=one_device_mesh())
    keep = mask.astype(bool)
    np.testing.assert_allclose(ftjax_logits(model, ids, mask)[keep], ref[keep], atol=ATOL, rtol=0)

    exported = reload_in_transformers(transformers.AutoModelForCausalLM, model, tmp_path / "out")
    np.testing.assert_allclose(torch_logits(exported, ids, mask)[keep], ref[keep], atol=1e-5, rtol=0)


def reload_in_transformers(cls, model, out_dir) -> torch.nn.Module:
    """ftjax export -> transformers load, asserting no missing/unexpected/mismatched weights."""
    save_pretrained(model, out_dir)
    reloaded, info = cls.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return reloaded.eval()


def test_llama3_rope_scaling_matters(tmp_path):
    """Guard against a vacuous pass: without the llama3 scaling the logits must differ."""
    make_hf(transformers.AutoModelForCausalLM.from_config, hf_config("llama3"), tmp_path)
    ids, mask = padded_batch()
    scaled, _ = from_pretrained(tmp_path, mesh=one_device_mesh())
    plain, _ = from_pretrained(tmp_path, mesh=one_device_mesh(), rope_scaling=None)
    assert np.abs(ftjax_logits(scaled, ids, mask) - ftjax_logits(plain, ids, mask)).max() > 1e-2


@pytest.mark.parametrize("head,cls", [
    ("sequence_classification", transformers.AutoModelForSequenceClassification),
    ("token_classification", transformers.AutoModelForTokenClassification)])
def test_classification_heads_match_transformers(head, cls, tmp_path):
    ref_model = make_hf(cls.from_config, hf_config("qwen2", num_labels=3), tmp_path)
    ids, mask = padded_batch()
    ref = torch_logits(ref_model, ids, mask)
    model, _ = from_pretrained(tmp_path, head=head, mesh=one_device_mesh())
    out = ftjax_logits(model, ids, mask)
    exported = torch_logits(reload_in_transformers(cls, model, tmp_path / "out"), ids, mask)
    if head == "token_classification":
        keep = mask.astype(bool)
        out, ref, exported = out[keep], ref[keep], exported[keep]
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(exported, ref, atol=1e-5, rtol=0)


def _lm_loss(logits, ids, mask):
    """Mean next-token cross-entropy over targets whose input and target are both real."""
    weights = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    return (ce * weights).sum() / weights.sum()


def test_embedding_gradient_matches_torch(tmp_path):
    ref_model = make_hf(transformers.AutoModelForCausalLM.from_config, hf_config("llama3"), tmp_path)
    ids, mask = padded_batch()
    logits = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    m = torch.tensor(mask, dtype=torch.float32)
    w = m[:, 1:] * m[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           torch.tensor(ids)[:, 1:].reshape(-1), reduction="none")
    ((ce * w.reshape(-1)).sum() / w.sum()).backward()
    ref_grad = ref_model.model.embed_tokens.weight.grad.numpy()

    model, _ = from_pretrained(tmp_path, mesh=one_device_mesh())
    grads = nnx.grad(lambda mdl: _lm_loss(mdl(jnp.asarray(ids), jnp.asarray(mask)),
                                          jnp.asarray(ids), jnp.asarray(mask)))(model)
    grad = np.asarray(grads["model"]["embed_tokens"]["embedding"][...])
    rows = [int(ids[0, 3]), int(ids[1, 0])]  # a token used as input (and tied output row)
    assert np.abs(ref_grad[rows]).max() > 1e-4
    np.testing.assert_allclose(grad[rows], ref_grad[rows], atol=1e-5, rtol=0)


def test_2x4_mesh_matches_one_device(tmp_path):
    make_hf(transformers.AutoModelForCausalLM.from_config, hf_config("qwen2"), tmp_path)
    ids, mask = padded_batch()
    single, _ = from_pretrained(tmp_path, mesh=one_device_mesh())
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    sharded, _ = from_pretrained(tmp_path, mesh=mesh)
    q = sharded.model.layers.self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert len(q.addressable_shards) == 8
    keep = mask.astype(bool)
    np.testing.assert_allclose(ftjax_logits(sharded, ids, mask)[keep],
                               ftjax_logits(single, ids, mask)[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset,published", [
    ("llama3-8b", 8_030_261_248), ("llama3-1b", 1_235_814_400), ("qwen2.5-7b", 7_615_616_512),
    ("smollm2-135m", 134_515_008), ("mistral-7b", 7_241_732_096)])
def test_full_size_preset_parameter_counts(preset, published):
    family, cfg = registry.get_preset(preset)
    abstract = nnx.eval_shape(lambda: family.build(cfg, "causal_lm", 0, nnx.Rngs(0)))
    assert registry.count_params(abstract) == published
