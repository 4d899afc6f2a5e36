"""GPT-2 parity with PyTorch transformers: tiny random models with every head on a padded batch,
export back to torch (fused ``c_attn``), and the full-size parameter count."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from ftjax.models import gpt2, registry
from hf_weights import export_torch_weights, load_torch_weights

NUM_LABELS = 3
PAD = 0


def hf_config() -> transformers.GPT2Config:
    return transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   pad_token_id=PAD, num_labels=NUM_LABELS,
                                   attn_implementation="eager")


def hf_class(head: str):
    return getattr(transformers, "GPT2" + gpt2.HF_HEAD_SUFFIX[head])


def make_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, size=(3, 9))
    mask = (np.arange(9)[None] < np.array([[9], [6], [3]])).astype(np.int64)
    return np.where(mask == 1, ids, PAD), mask


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


def pair(head: str):
    torch.manual_seed(0)
    ref = hf_class(head)(hf_config()).eval()
    cfg = gpt2.from_hf_config(hf_config().to_dict())
    model = gpt2.build(cfg, head, NUM_LABELS, nnx.Rngs(1))
    tied = ["lm_head.weight"] if head == "causal_lm" else []
    load_torch_weights(model, gpt2.hf_weight_map(cfg, head), ref.state_dict(), tied=tied)
    return ref, model, cfg


@pytest.mark.parametrize("head", tuple(gpt2.HF_HEAD_SUFFIX))
def test_logits_match_transformers(head):
    ref, model, _ = pair(head)
    compare(ref, model, head)


def test_export_reloads_in_transformers():
    _, model, cfg = pair("causal_lm")
    hf_cfg = transformers.GPT2Config(**gpt2.to_hf_config(cfg), attn_implementation="eager")
    torch.manual_seed(123)  # different init: every tensor must come from the export
    reloaded = transformers.GPT2LMHeadModel(hf_cfg).eval()
    missing, unexpected = reloaded.load_state_dict(
        export_torch_weights(model, gpt2.hf_weight_map(cfg, "causal_lm")), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    reloaded.tie_weights()
    compare(reloaded, model, "causal_lm")
    assert gpt2.from_hf_config(gpt2.to_hf_config(cfg)) == cfg


def test_full_size_parameter_count():
    family, cfg = registry.get_preset("gpt2")
    abstract = nnx.eval_shape(lambda: family.build(cfg, "causal_lm", 0, nnx.Rngs(0)))
    assert registry.count_params(abstract) == 124_439_808
