"""Gemma 1, 2 and 3 (text) decoders; ``model_type`` picks the variant.

All: GeGLU MLP, ``(1 + w)`` RMSNorm, embeddings scaled by ``sqrt(hidden)`` in the compute dtype,
``query_pre_attn_scalar`` attention scaling, tied LM head. Gemma 2 adds sandwich norms, attention
and final logit soft-capping and alternating sliding-window / global layers; Gemma 3 adds q/k
norms and a separate rope theta for its local layers (``layer_types``). Which layers are local is
handed to the scanned stack as a per-layer boolean, so layers stay stacked.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import sharding
from ftjax.models import decoder, heads, layers, llama, registry, weights
from ftjax.models.kv_cache import LayerKV
from ftjax.models.stack import stack_layers

HF_MODEL_TYPES = {"gemma": "Gemma", "gemma2": "Gemma2", "gemma3_text": "Gemma3"}
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    vocab_size: int = 256000
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_layers: int = 18
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0  # global layers
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # global layers, dict items
    rope_local_theta: float | None = None  # Gemma 3 local layers (None: rope_theta)
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float | None = None  # None: head_dim
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer SLIDING / FULL; None: all FULL
    attention_bias: bool = False
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1
    model_type: str = "gemma"  # gemma | gemma2 | gemma3_text
    # runtime switches (not architecture)
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"

    @property
    def sandwich_norms(self) -> bool:
        return self.model_type != "gemma"

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "gemma3_text"

    @property
    def local_layers(self) -> tuple[bool, ...]:
        types = self.layer_types or (FULL,) * self.num_layers
        return tuple(t == SLIDING for t in types)


def layer_pattern(num_layers: int, period: int) -> tuple[str, ...]:
    """transformers' default ``layer_types``: every ``period``-th layer global, the rest local."""
    return tuple(SLIDING if (i + 1) % period else FULL for i in range(num_layers))


def _dtypes(cfg: GemmaConfig) -> dict:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _norm(cfg: GemmaConfig, features: int, rngs: nnx.Rngs) -> layers.RMSNorm:
    return layers.RMSNorm(features, eps=cfg.rms_norm_eps, offset=1.0, rngs=rngs, **_dtypes(cfg))


class GemmaAttention(llama.LlamaAttention):
    """Llama's attention forward with Gemma's query scale, soft-cap and (1 + w) q/k norms."""

    def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
        d, h, std, dt = cfg.hidden_size, cfg.head_dim, cfg.initializer_range, _dtypes(cfg)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, h
        self.scale = (cfg.query_pre_attn_scalar or h) ** -0.5
        self.softcap = cfg.attn_logit_softcap
        proj = dict(use_bias=cfg.attention_bias, init_std=std, rngs=rngs, **dt)
        self.q_proj = layers.Linear(d, cfg.num_heads * h, axes=("embed", "heads"), **proj)
        self.k_proj = layers.Linear(d, cfg.num_kv_heads * h, axes=("embed", "kv"), **proj)
        self.v_proj = layers.Linear(d, cfg.num_kv_heads * h, axes=("embed", "kv"), **proj)
        self.o_proj = layers.Linear(cfg.num_heads * h, d, axes=("heads", "embed"), **proj)
        self.q_norm = _norm(cfg, h, rngs) if cfg.qk_norm else None
        self.k_norm = _norm(cfg, h, rngs) if cfg.qk_norm else None


class GemmaMLP(nnx.Module):
    """GeGLU: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        lin = dict(init_std=cfg.initializer_range, rngs=rngs, **_dtypes(cfg))
        self.act = layers.activation(cfg.hidden_activation)
        self.gate_proj = layers.Linear(d, f, axes=("embed", "mlp"), **lin)
        self.up_proj = layers.Linear(d, f, axes=("embed", "mlp"), **lin)
        self.down_proj = layers.Linear(f, d, axes=("mlp", "embed"), **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GemmaDecoderLayer(nnx.Module):
    """Gemma 1: pre-norms (``post_attention_layernorm`` is the pre-MLP norm, as in HF).
    Gemma 2/3: sandwich norms around both the attention and the MLP."""

    def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.input_layernorm = _norm(cfg, d, rngs)
        self.self_attn = GemmaAttention(cfg, rngs=rngs)
        self.post_attention_layernorm = _norm(cfg, d, rngs)
        self.mlp = GemmaMLP(cfg, rngs=rngs)
        sandwich = cfg.sandwich_norms
        self.pre_feedforward_layernorm = _norm(cfg, d, rngs) if sandwich else None
        self.post_feedforward_layernorm = _norm(cfg, d, rngs) if sandwich else None

    def __call__(self, x: jax.Array, ctx: decoder.Context, cache: LayerKV | None):
        if self.pre_feedforward_layernorm is None:
            return decoder.pre_norm_block(x, ctx, cache, self.input_layernorm, self.self_attn,
                                          self.post_attention_layernorm, self.mlp)
        attn, cache = self.self_attn(self.input_layernorm(x), ctx, cache)
        x = x + self.post_attention_layernorm(attn)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return sharding.constrain(x, "batch", "act_seq", "act_embed"), cache


class GemmaModel(decoder.Decoder):
    """The backbone: token ids -> final normalised hidden states ``[B, T, D]``."""

    def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size,
                                         init_std=cfg.initializer_range, rngs=rngs, **_dtypes(cfg))
        self.layers = stack_layers(lambda r: GemmaDecoderLayer(cfg, rngs=r), cfg.num_layers, rngs)
        self.norm = _norm(cfg, cfg.hidden_size, rngs)

    def embed(self, input_ids: jax.Array, positions: jax.Array,
              inputs_embeds: jax.Array | None) -> jax.Array:
        """Token embeddings scaled by ``sqrt(hidden)`` in the compute dtype (given ones as they are)."""
        if inputs_embeds is not None:
            return inputs_embeds
        h = self.embed_tokens(input_ids)
        return h * jnp.asarray(self.cfg.hidden_size ** 0.5, h.dtype)

    def layer_context(self, positions: jax.Array, mask: decoder.MaskFn
                      ) -> tuple[Callable[[Any], decoder.Context], Any]:
        """Each layer's mask and rope frequencies: local (sliding-window) or global."""
        cfg = self.cfg
        masks = [mask(window) for window in (None, cfg.sliding_window)]
        scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
        inv_freqs = (layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, scaling),
                     layers.rope_inv_freq(cfg.head_dim, cfg.rope_local_theta or cfg.rope_theta))

        def context(local: jax.Array) -> decoder.Context:
            return decoder.Context(positions, jnp.where(local, masks[1], masks[0]),
                                   jnp.where(local, inv_freqs[1], inv_freqs[0]))
        return context, jnp.asarray(cfg.local_layers)


def build(cfg: GemmaConfig, head: str, num_labels: int, rngs: nnx.Rngs) -> nnx.Module:
    """Gemma with a ``heads.py`` head (tied, final-softcapped LM head or a ``score`` head)."""
    return heads.build(GemmaModel(cfg, rngs=rngs), cfg, head, num_labels, rngs, tie=True,
                       final_softcap=cfg.final_logit_softcap)


# ---------------------------------------------------------------------------------------------
# Hugging Face names and configs
# ---------------------------------------------------------------------------------------------

def hf_weight_map(cfg: GemmaConfig, head: str) -> list[weights.WeightSpec]:
    """ftjax paths <-> transformers ``Gemma*``/``Gemma2*``/``Gemma3*`` (text) names."""
    W, L, lay = weights.WeightSpec, f"model.layers.{weights.LAYER}", ("model", "layers")
    norms = ["input_layernorm", "post_attention_layernorm"]
    if cfg.sandwich_norms:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    specs = [W(("model", "embed_tokens", "embedding"), "model.embed_tokens.weight"),
             W(("model", "norm", "scale"), "model.norm.weight")]
    specs += [W(lay + (n, "scale"), f"{L}.{n}.weight") for n in norms]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        specs += weights.linear(lay + ("self_attn", name), f"{L}.self_attn.{name}", cfg.attention_bias)
    if cfg.qk_norm:
        specs += [W(lay + ("self_attn", n, "scale"), f"{L}.self_attn.{n}.weight")
                  for n in ("q_norm", "k_norm")]
    for name in ("gate_proj", "up_proj", "down_proj"):
        specs += weights.linear(lay + ("mlp", name), f"{L}.mlp.{name}", False)
    if head == "sequence_classification":
        specs += weights.linear(("score",), "score", False)
    elif head == "token_classification":
        specs += weights.linear(("score",), "score", True)
    return specs


def _rope(params: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(theta, scaling items) from one transformers v5 ``rope_parameters`` entry."""
    params = dict(params)
    theta = float(params.pop("rope_theta"))
    if params.get("rope_type", "default") == "default":
        return theta, None
    return theta, tuple(sorted(params.items()))


def from_hf_config(hf: dict[str, Any]) -> GemmaConfig:
    """A ``GemmaConfig`` from a transformers ``config.json`` dict (gemma, gemma2, gemma3_text)."""
    mt = hf.get("model_type")
    if mt not in HF_MODEL_TYPES:
        raise ValueError(f"model_type {mt!r} is not a Gemma type {sorted(HF_MODEL_TYPES)}")
    if hf.get("use_bidirectional_attention"):
        raise NotImplementedError("bidirectional Gemma attention is not supported")
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0),
                                         **(hf.get("rope_scaling") or {})}
    local_theta = None
    if mt == "gemma3_text":
        if FULL not in rope:  # legacy flat keys
            rope = {FULL: rope, SLIDING: {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}}
        local_theta, _ = _rope(rope[SLIDING])
        rope = rope[FULL]
    theta, scaling = _rope(rope)
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None and mt != "gemma":
        types = layer_pattern(n, 2 if mt == "gemma2" else hf.get("sliding_window_pattern", 6))
    eos = hf.get("eos_token_id")
    return GemmaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=n,
        num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        hidden_activation=hf.get("hidden_activation") or "gelu_pytorch_tanh",
        rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        sliding_window=hf.get("sliding_window") if types else None,
        layer_types=tuple(types) if types else None,
        attention_bias=hf.get("attention_bias", False),
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        initializer_range=hf.get("initializer_range", 0.02), pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos, model_type=mt)


def to_hf_config(cfg: GemmaConfig) -> dict[str, Any]:
    """A transformers ``config.json`` dict (without ``architectures``) for ``cfg``."""
    if cfg.model_type == "gemma" and (cfg.layer_types or cfg.attn_logit_softcap
                                      or cfg.final_logit_softcap):
        raise ValueError("Gemma 1 (model_type 'gemma') has no sliding windows or soft-capping")
    rope = {"rope_type": "default", **dict(cfg.rope_scaling or ()), "rope_theta": cfg.rope_theta}
    d = dict(model_type=cfg.model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
             intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
             num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
             head_dim=cfg.head_dim, hidden_activation=cfg.hidden_activation,
             max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
             attention_bias=cfg.attention_bias, initializer_range=cfg.initializer_range,
             pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
             eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple)
             else cfg.eos_token_id, tie_word_embeddings=True, rope_parameters=rope)
    if cfg.model_type != "gemma":
        d.update(query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
                 attn_logit_softcapping=cfg.attn_logit_softcap,
                 final_logit_softcapping=cfg.final_logit_softcap,
                 sliding_window=cfg.sliding_window,
                 layer_types=list(cfg.layer_types or (FULL,) * cfg.num_layers))
    if cfg.model_type == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        d["rope_parameters"] = {FULL: rope, SLIDING: local}
    return d


# name -> architecture kwargs (random init); real sizes follow the published configs.
PRESETS = {
    "tiny-gemma2": dict(vocab_size=256000, hidden_size=64, intermediate_size=128,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        query_pre_attn_scalar=16, attn_logit_softcap=50.0,
                        final_logit_softcap=30.0, sliding_window=64,
                        layer_types=layer_pattern(2, 2), model_type="gemma2"),
    "gemma-2b": dict(),
    "gemma2-9b": dict(hidden_size=3584, intermediate_size=14336, num_layers=42,
                      num_heads=16, num_kv_heads=8, query_pre_attn_scalar=256,
                      attn_logit_softcap=50.0, final_logit_softcap=30.0,
                      sliding_window=4096, layer_types=layer_pattern(42, 2),
                      model_type="gemma2"),
    "gemma3-1b": dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                      num_layers=26, num_heads=4, num_kv_heads=1, rope_theta=1e6,
                      rope_local_theta=1e4, query_pre_attn_scalar=256,
                      sliding_window=512, layer_types=layer_pattern(26, 6),
                      max_position_embeddings=32768, model_type="gemma3_text"),
}

registry.register(registry.Family(
    "gemma", GemmaConfig, build, model_types=HF_MODEL_TYPES, hf_weight_map=hf_weight_map,
    from_hf_config=from_hf_config, to_hf_config=to_hf_config, presets=PRESETS))
