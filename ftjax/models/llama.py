"""Llama-family decoder: Llama 2/3, Mistral, Qwen2/2.5/3, SmolLM2.

RMSNorm, rotary embeddings (optionally llama3-scaled), grouped-query attention with optional
q/k/v biases (Qwen2), q/k RMSNorm (Qwen3) and a sliding window (Mistral), SwiGLU MLP. Parameter
names follow the Hugging Face module tree so checkpoint mapping stays one line per tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import sharding
from ftjax.models import layers, weights
from ftjax.models.stack import run_layers, stack_layers


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # dict items, hashable
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    sliding_window: int | None = None  # Mistral
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    model_type: str = "llama"
    # runtime switches (not architecture)
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None


def _dtypes(cfg: LlamaConfig) -> dict:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, h, std = cfg.hidden_size, cfg.resolved_head_dim, cfg.initializer_range
        dt = _dtypes(cfg)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, h
        self.q_proj = layers.Linear(d, cfg.num_heads * h, axes=("embed", "heads"),
                                    use_bias=cfg.attention_bias, init_std=std, rngs=rngs, **dt)
        self.k_proj = layers.Linear(d, cfg.num_kv_heads * h, axes=("embed", "kv"),
                                    use_bias=cfg.attention_bias, init_std=std, rngs=rngs, **dt)
        self.v_proj = layers.Linear(d, cfg.num_kv_heads * h, axes=("embed", "kv"),
                                    use_bias=cfg.attention_bias, init_std=std, rngs=rngs, **dt)
        self.o_proj = layers.Linear(cfg.num_heads * h, d, axes=("heads", "embed"),
                                    init_std=std, rngs=rngs, **dt)
        if cfg.qk_norm:
            self.q_norm = layers.RMSNorm(h, eps=cfg.rms_norm_eps, rngs=rngs, **dt)
            self.k_norm = layers.RMSNorm(h, eps=cfg.rms_norm_eps, rngs=rngs, **dt)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
                 inv_freq: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = layers.apply_rope(q, positions, inv_freq)
        k = layers.apply_rope(k, positions, inv_freq)
        out = layers.dot_product_attention(q, k, v, mask, scale=self.head_dim ** -0.5)
        return self.o_proj(out.reshape(b, t, -1))


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, f, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        dt = _dtypes(cfg)
        self.gate_proj = layers.Linear(d, f, axes=("embed", "mlp"), use_bias=cfg.mlp_bias,
                                       init_std=std, rngs=rngs, **dt)
        self.up_proj = layers.Linear(d, f, axes=("embed", "mlp"), use_bias=cfg.mlp_bias,
                                     init_std=std, rngs=rngs, **dt)
        self.down_proj = layers.Linear(f, d, axes=("mlp", "embed"), use_bias=cfg.mlp_bias,
                                       init_std=std, rngs=rngs, **dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        dt = _dtypes(cfg)
        self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, **dt)
        self.self_attn = LlamaAttention(cfg, rngs=rngs)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                                       rngs=rngs, **dt)
        self.mlp = LlamaMLP(cfg, rngs=rngs)

    def __call__(self, x, positions, mask, inv_freq):
        x = x + self.self_attn(self.input_layernorm(x), positions, mask, inv_freq)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return sharding.constrain(x, "batch", "act_seq", "act_embed")


class LlamaModel(nnx.Module):
    """The backbone: token ids -> final normalised hidden states ``[B, T, D]``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = _dtypes(cfg)
        self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size,
                                         init_std=cfg.initializer_range, rngs=rngs, **dt)
        self.layers = stack_layers(lambda r: LlamaDecoderLayer(cfg, rngs=r), cfg.num_layers, rngs)
        self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, **dt)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 inputs_embeds: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        positions, segment_ids = layers.default_positions_and_segments(
            input_ids, attention_mask, positions, segment_ids)
        mask = layers.attention_mask(segment_ids, segment_ids, positions, positions, causal=True,
                                     sliding_window=cfg.sliding_window)
        inv_freq = layers.rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        h = sharding.constrain(h, "batch", "act_seq", "act_embed")
        h = run_layers(self.layers, h, lambda blk, x, _: blk(x, positions, mask, inv_freq),
                       scan=cfg.scan_layers, remat=cfg.remat)
        return self.norm(h)


def hf_weight_map(cfg: LlamaConfig, head: str) -> list[weights.WeightSpec]:
    """ftjax parameter paths <-> transformers ``Llama*``/``Mistral*``/``Qwen2*``/``Qwen3*`` names."""
    W, L = weights.WeightSpec, f"model.layers.{weights.LAYER}"
    lay = ("model", "layers")
    specs = [W(("model", "embed_tokens", "embedding"), "model.embed_tokens.weight"),
             W(("model", "norm", "scale"), "model.norm.weight"),
             W(lay + ("input_layernorm", "scale"), f"{L}.input_layernorm.weight"),
             W(lay + ("post_attention_layernorm", "scale"), f"{L}.post_attention_layernorm.weight")]
    for name in ("q_proj", "k_proj", "v_proj"):
        specs += weights.linear(lay + ("self_attn", name), f"{L}.self_attn.{name}", cfg.attention_bias)
    specs += weights.linear(lay + ("self_attn", "o_proj"), f"{L}.self_attn.o_proj", False)
    if cfg.qk_norm:
        specs += [W(lay + ("self_attn", "q_norm", "scale"), f"{L}.self_attn.q_norm.weight"),
                  W(lay + ("self_attn", "k_norm", "scale"), f"{L}.self_attn.k_norm.weight")]
    for name in ("gate_proj", "up_proj", "down_proj"):
        specs += weights.linear(lay + ("mlp", name), f"{L}.mlp.{name}", cfg.mlp_bias)
    if head == "causal_lm" and not cfg.tie_embeddings:
        specs += weights.linear(("lm_head",), "lm_head", False)
    elif head == "sequence_classification":
        specs += weights.linear(("score",), "score", False)
    elif head == "token_classification":
        specs += weights.linear(("score",), "score", True)
    return specs
