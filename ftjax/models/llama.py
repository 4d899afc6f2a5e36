"""Llama-family decoder: Llama 2/3, Mistral, Qwen2/2.5/3, SmolLM2.

RMSNorm, rotary embeddings (optionally llama3-scaled), grouped-query attention with optional
q/k/v biases (Qwen2), q/k RMSNorm (Qwen3) and a sliding window (Mistral), SwiGLU MLP. Parameter
names follow the Hugging Face module tree so checkpoint mapping stays one line per tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.models import decoder, heads, layers, registry, weights
from ftjax.models.kv_cache import LayerKV
from ftjax.models.stack import stack_layers


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


class LlamaAttention(decoder.Attention):
    """Rotary grouped-query attention; Gemma reuses the forward with its own scale and soft-cap."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, h, std = cfg.hidden_size, cfg.resolved_head_dim, cfg.initializer_range
        dt = _dtypes(cfg)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, h
        self.scale = h ** -0.5
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

    def __call__(self, x: jax.Array, ctx: decoder.Context, cache: LayerKV | None
                 ) -> tuple[jax.Array, LayerKV | None]:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = layers.apply_rope(q, ctx.positions, ctx.inv_freq)
        k = layers.apply_rope(k, ctx.positions, ctx.inv_freq)
        out, cache = self.attend(q, k, v, ctx.mask, cache)
        return self.o_proj(out), cache


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

    def __call__(self, x: jax.Array, ctx: decoder.Context, cache: LayerKV | None):
        return decoder.pre_norm_block(x, ctx, cache, self.input_layernorm, self.self_attn,
                                      self.post_attention_layernorm, self.mlp)


class LlamaModel(decoder.Decoder):
    """The backbone: token ids -> final normalised hidden states ``[B, T, D]``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = _dtypes(cfg)
        self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size,
                                         init_std=cfg.initializer_range, rngs=rngs, **dt)
        self.layers = stack_layers(lambda r: LlamaDecoderLayer(cfg, rngs=r), cfg.num_layers, rngs)
        self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, **dt)

    def layer_context(self, positions: jax.Array, mask: decoder.MaskFn
                      ) -> tuple[Callable[[Any], decoder.Context], Any]:
        cfg = self.cfg
        inv_freq = layers.rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        ctx = decoder.Context(positions, mask(cfg.sliding_window), inv_freq)
        return lambda _: ctx, None


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


# ---------------------------------------------------------------------------------------------
# transformers config.json <-> LlamaConfig
# ---------------------------------------------------------------------------------------------

HF_MODEL_TYPES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
_ROPE_KINDS = ("default", "linear", "llama3")


def _hf_rope(d: dict) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(theta, scaling) from either transformers v5 ``rope_parameters`` or legacy top-level keys."""
    params = dict(d.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = dict(d.get("rope_scaling") or params)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in _ROPE_KINDS:
        raise NotImplementedError(f"rope type {kind!r} is not supported (supported: {_ROPE_KINDS})")
    if kind == "default":
        return theta, None
    scaling.pop("type", None)
    scaling["rope_type"] = kind
    return theta, tuple(sorted(scaling.items()))


def _hf_sliding_window(d: dict) -> int | None:
    """Mistral windows every layer; Qwen2/3 only when ``use_sliding_window`` (per ``layer_types``)."""
    if d["model_type"] == "mistral":
        return d.get("sliding_window")
    if d["model_type"] not in ("qwen2", "qwen3") or not d.get("use_sliding_window"):
        return None
    n = d["num_hidden_layers"]
    types = d.get("layer_types") or ["sliding_attention" if i >= d.get("max_window_layers", n)
                                     else "full_attention" for i in range(n)]
    if set(types) == {"full_attention"}:
        return None
    if set(types) == {"sliding_attention"}:
        return d["sliding_window"]
    raise NotImplementedError("mixed full/sliding attention layers are not supported for "
                              f"{d['model_type']} (layer_types={types})")


def from_hf_config(d: dict) -> LlamaConfig:
    """LlamaConfig from a transformers ``config.json`` dict (llama, mistral, qwen2, qwen3)."""
    model_type = d["model_type"]
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not a llama-family type {sorted(HF_MODEL_TYPES)}")
    if d.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
    theta, scaling = _hf_rope(d)
    eos = d.get("eos_token_id")
    head_dim = d.get("head_dim")  # kept only when it differs from hidden_size // num_heads
    if head_dim == d["hidden_size"] // d["num_attention_heads"]:
        head_dim = None
    return LlamaConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=head_dim, rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_embeddings=d.get("tie_word_embeddings", False),
        attention_bias=True if model_type == "qwen2" else d.get("attention_bias", False),
        mlp_bias=d.get("mlp_bias", False), qk_norm=model_type == "qwen3",
        sliding_window=_hf_sliding_window(d),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        initializer_range=d.get("initializer_range", 0.02),
        pad_token_id=d.get("pad_token_id"), bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos, model_type=model_type)


def to_hf_config(cfg: LlamaConfig) -> dict:
    """A transformers ``config.json`` dict (without ``architectures``) for ``cfg``."""
    mt = cfg.model_type
    if mt not in HF_MODEL_TYPES:
        raise ValueError(f"model_type {mt!r} is not a llama-family type {sorted(HF_MODEL_TYPES)}")
    checks = {"attention_bias": cfg.attention_bias != (mt == "qwen2") and mt in ("mistral", "qwen2"),
              "mlp_bias": cfg.mlp_bias and mt != "llama", "qk_norm": cfg.qk_norm != (mt == "qwen3"),
              "sliding_window": cfg.sliding_window is not None and mt == "llama"}
    bad = [k for k, v in checks.items() if v]
    if bad:
        raise ValueError(f"{bad} cannot be expressed by transformers model_type {mt!r}")
    rope = {"rope_type": "default", **(cfg.rope_scaling_dict or {}), "rope_theta": cfg.rope_theta}
    d = dict(model_type=mt, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
             intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
             num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
             head_dim=cfg.resolved_head_dim, hidden_act="silu",
             max_position_embeddings=cfg.max_position_embeddings,
             initializer_range=cfg.initializer_range, rms_norm_eps=cfg.rms_norm_eps,
             rope_parameters=rope, tie_word_embeddings=cfg.tie_embeddings,
             pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
             eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple)
             else cfg.eos_token_id)
    if mt in ("llama", "qwen3"):
        d["attention_bias"] = cfg.attention_bias
    if mt == "llama":
        d["mlp_bias"] = cfg.mlp_bias
    if mt == "mistral":
        d["sliding_window"] = cfg.sliding_window
    if mt in ("qwen2", "qwen3"):
        windowed = cfg.sliding_window is not None
        d.update(use_sliding_window=windowed, sliding_window=cfg.sliding_window,
                 max_window_layers=0 if windowed else cfg.num_layers)
    return d


# name -> architecture kwargs (random init); real sizes follow the published configs.
PRESETS = {
    "tiny-llama": dict(vocab_size=30522, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=512,
                       tie_embeddings=True, pad_token_id=0),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_embeddings=True, max_position_embeddings=8192,
                         bos_token_id=1, eos_token_id=2),
    "llama3-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                      num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_embeddings=True,
                      max_position_embeddings=131072,
                      rope_scaling=(("rope_type", "llama3"), ("factor", 32.0),
                      ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                      ("original_max_position_embeddings", 8192))),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0,
                      rms_norm_eps=1e-5, max_position_embeddings=8192),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5,
                       sliding_window=4096, max_position_embeddings=32768,
                       model_type="mistral"),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_layers=28, num_heads=28, num_kv_heads=4, rope_theta=1000000.0,
                       attention_bias=True, max_position_embeddings=32768,
                       model_type="qwen2"),
}

def build(cfg: LlamaConfig, head: str, num_labels: int, rngs: nnx.Rngs) -> nnx.Module:
    """A Llama-family backbone with a ``heads.py`` head."""
    return heads.build(LlamaModel(cfg, rngs=rngs), cfg, head, num_labels, rngs,
                       tie=cfg.tie_embeddings)


registry.register(registry.Family(
    "llama", LlamaConfig, build, model_types=HF_MODEL_TYPES, hf_weight_map=hf_weight_map,
    from_hf_config=from_hf_config, to_hf_config=to_hf_config, presets=PRESETS))
