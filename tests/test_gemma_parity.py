"""Gemma 1/2/3 parity with PyTorch transformers: tiny random models (Gemma 2 with soft-caps and a
sliding window shorter than the batch, Gemma 3 with q/k norms, local rope theta and a custom
layer pattern), heads, export back to torch, and full-size parameter counts."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from ftjax.models import gemma, registry
from hf_weights import export_torch_weights, load_torch_weights

NUM_LABELS = 3
PAD = 0
# initializer_range 0.2 makes soft-caps and windows change the logits measurably.
TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, pad_token_id=PAD, initializer_range=0.2,
            num_labels=NUM_LABELS, attn_implementation="eager")
HF_CONFIGS = {
    "gemma": lambda: transformers.GemmaConfig(**TINY, num_hidden_layers=2),
    "gemma2": lambda: transformers.Gemma2Config(
        **TINY, num_hidden_layers=4, sliding_window=3, attn_logit_softcapping=1.0,
        final_logit_softcapping=2.0, query_pre_attn_scalar=16),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **TINY, num_hidden_layers=4, sliding_window=3, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
}
HF_CLASSES = {("gemma", "causal_lm"): "GemmaForCausalLM",
              ("gemma2", "causal_lm"): "Gemma2ForCausalLM",
              ("gemma2", "sequence_classification"): "Gemma2ForSequenceClassification",
              ("gemma2", "token_classification"): "Gemma2ForTokenClassification",
              ("gemma3_text", "causal_lm"): "Gemma3ForCausalLM",
              ("gemma3_text", "sequence_classification"): "Gemma3TextForSequenceClassification"}


def make_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, size=(3, 9))
    mask = (np.arange(9)[None] < np.array([[9], [6], [3]])).astype(np.int64)
    return np.where(mask == 1, ids, PAD), mask


def torch_model(variant: str, head: str, seed: int = 0):
    torch.manual_seed(seed)
    ref = getattr(transformers, HF_CLASSES[variant, head])(HF_CONFIGS[variant]()).eval()
    with torch.no_grad():  # HF initialises the (1 + w) norms at w = 0; make them matter
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return ref


def compare(ref, model, head):
    ids, mask = make_batch()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    keep = mask.astype(bool)
    if head == "sequence_classification":
        np.testing.assert_allclose(got, want, atol=1e-4)
    else:
        np.testing.assert_allclose(got[keep], want[keep], atol=1e-4)


def pair(variant: str, head: str):
    ref = torch_model(variant, head)
    cfg = gemma.from_hf_config(HF_CONFIGS[variant]().to_dict())
    model = gemma.build(cfg, head, NUM_LABELS, nnx.Rngs(1))
    tied = ["lm_head.weight"] if head == "causal_lm" else []
    load_torch_weights(model, gemma.hf_weight_map(cfg, head), ref.state_dict(), tied=tied)
    return ref, model, cfg


@pytest.mark.parametrize("variant,head", sorted(HF_CLASSES))
def test_logits_match_transformers(variant, head):
    ref, model, _ = pair(variant, head)
    compare(ref, model, head)


def test_config_reads_gemma_features():
    g2 = gemma.from_hf_config(HF_CONFIGS["gemma2"]().to_dict())
    assert g2.local_layers == (True, False, True, False) and g2.attn_logit_softcap == 1.0
    g3 = gemma.from_hf_config(HF_CONFIGS["gemma3_text"]().to_dict())
    assert g3.rope_local_theta == 100.0 and dict(g3.rope_scaling)["factor"] == 2.0


@pytest.mark.parametrize("variant", ["gemma2", "gemma3_text"])
def test_export_reloads_in_transformers(variant):
    _, model, cfg = pair(variant, "causal_lm")
    hf_cfg = transformers.AutoConfig.for_model(**gemma.to_hf_config(cfg), attn_implementation="eager")
    torch.manual_seed(123)  # different init: every tensor must come from the export
    reloaded = getattr(transformers, HF_CLASSES[variant, "causal_lm"])(hf_cfg).eval()
    missing, unexpected = reloaded.load_state_dict(
        export_torch_weights(model, gemma.hf_weight_map(cfg, "causal_lm")), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    reloaded.tie_weights()
    compare(reloaded, model, "causal_lm")
    assert gemma.from_hf_config(gemma.to_hf_config(cfg)) == cfg


@pytest.mark.parametrize("name,count", [("gemma-2b", 2_506_172_416), ("gemma2-9b", 9_241_705_984),
                                        ("gemma3-1b", 999_885_952)])
def test_full_size_parameter_counts(name, count):
    family, cfg = registry.get_preset(name)
    abstract = nnx.eval_shape(lambda: family.build(cfg, "causal_lm", 0, nnx.Rngs(0)))
    assert registry.count_params(abstract) == count
