"""Prefix tuning on GPT-2 and Gemma against HF peft: same base, same prefix -> same logits
(float32, atol 1e-4), and the PEFT export/import round trip."""

from __future__ import annotations

import jax
import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers

from ftjax import peft, sharding
from ftjax.models.loading import from_pretrained
from test_peft_parity import ATOL, ftjax_logits, hf_logits, randomize, valid

FAMILIES = {
    "gpt2": (transformers.GPT2LMHeadModel, dict(model_type="gpt2", vocab_size=96, n_embd=32,
                                                n_layer=2, n_head=4, n_positions=64)),
    "gemma": (transformers.Gemma2ForCausalLM, dict(
        model_type="gemma2", vocab_size=96, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        # A window wider than prefix + tokens: transformers applies Gemma 2's local window to the
        # prefix keys too (they sit at cache positions 0..n-1), ftjax's prefix ignores windows.
        sliding_window=16, pad_token_id=0)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefix_tuning_matches_peft(family, tmp_path):
    cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    base = cls(transformers.AutoConfig.for_model(**kwargs)).eval()
    randomize(base, 0)
    base.save_pretrained(tmp_path / "base")
    rng = np.random.default_rng(0)
    mask = np.ones((2, 7), np.int64)
    mask[1, 5:] = 0
    b = dict(ids=np.where(mask == 1, rng.integers(3, 96, size=(2, 7)), 0), mask=mask)
    pm = hf_peft.get_peft_model(cls.from_pretrained(tmp_path / "base").eval(),
                                hf_peft.PrefixTuningConfig(num_virtual_tokens=3,
                                                           task_type="CAUSAL_LM"))
    randomize(pm, 1, only=("prompt_encoder",))
    pm.eval()
    pm.save_pretrained(tmp_path / "hf_adapter")
    expected = hf_logits(pm, b, "prefix")

    model, _ = from_pretrained(tmp_path / "base", mesh=sharding.make_mesh({}, devices=jax.devices()[:1]))
    plan = peft.import_peft(model, tmp_path / "hf_adapter")
    got = ftjax_logits(plan.model, b)
    np.testing.assert_allclose(valid(got, b), valid(expected, b), atol=ATOL, rtol=0)

    method_cfg = peft.method_from_peft(pm.peft_config["default"].to_dict(), model)
    peft.export_peft(plan.model, method_cfg, tmp_path / "ours", str(tmp_path / "base"))
    reloaded = hf_peft.PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "base").eval(),
                                                 tmp_path / "ours").eval()
    np.testing.assert_allclose(valid(hf_logits(reloaded, b, "prefix"), b), valid(got, b),
                               atol=ATOL, rtol=0)
