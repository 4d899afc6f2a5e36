"""Training FLOPs per token against parameter counts taken from transformers' own models."""

from __future__ import annotations

import jax
import pytest
import transformers

from ftjax import sharding
from ftjax.models import registry
from ftjax.train.flops import train_flops_per_token

T = 128


def _ours(preset: str, head: str) -> float:
    family, cfg = registry.get_preset(preset)
    model = registry.init_sharded(lambda r: family.build(cfg, head, 2, r),
                                  sharding.make_mesh({"fsdp": 1}, jax.devices()[:1]))
    return train_flops_per_token(model, T)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module", autouse=True)
def _meta():
    import torch
    with torch.device("meta"):  # shapes only
        yield


def test_encoder_counts_full_attention_and_no_embedding_lookups():
    ref = transformers.BertModel(transformers.BertConfig(
        vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4))
    matmul = _count(ref) - _count(ref.embeddings)
    assert _ours("tiny-bert", "encoder") == 6 * matmul + 12 * 2 * T * 64


def test_gpt2_counts_the_tied_table_once_and_no_position_lookup():
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50257, n_embd=64, n_layer=2, n_head=4, n_positions=512))
    matmul = _count(ref) - ref.transformer.wpe.weight.numel()  # wte is the tied LM head's matmul
    assert _ours("tiny-gpt2", "causal_lm") == 6 * matmul + 6 * 2 * T * 64
