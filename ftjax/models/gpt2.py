"""GPT-2 decoder: learned positions, pre-LN blocks, ``gelu_new`` MLP, tied LM head.

HF's ``Conv1D`` already stores weights ``[in, out]``, so kernels load untransposed; ``c_attn``
stays one fused ``[D, 3D]`` projection split into q, k, v after the matmul (as transformers
does), so export writes it back unchanged. Heads come from ``heads.py`` (backbone at ``model``).
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

HF_MODEL_TYPES = {"gpt2": "GPT2"}
HF_HEAD_SUFFIX = {"causal_lm": "LMHeadModel", "sequence_classification": "ForSequenceClassification",
                  "token_classification": "ForTokenClassification"}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    hidden_size: int = 768
    intermediate_size: int | None = None  # HF n_inner; None = 4 * hidden_size
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 1024
    activation: str = "gelu_new"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    model_type: str = "gpt2"
    # runtime switches (not architecture)
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"

    @property
    def resolved_intermediate_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size


def _dtypes(cfg: GPT2Config) -> dict:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _conv1d(cfg: GPT2Config, d_in: int, d_out: int, axes, rngs: nnx.Rngs) -> layers.Linear:
    return layers.Linear(d_in, d_out, axes=axes, use_bias=True, init_std=cfg.initializer_range,
                         rngs=rngs, **_dtypes(cfg))


def _layer_norm(cfg: GPT2Config, rngs: nnx.Rngs) -> layers.LayerNorm:
    return layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs, **_dtypes(cfg))


class GPT2Attention(decoder.Attention):
    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, d // cfg.num_heads
        self.scale = self.head_dim ** -0.5
        self.c_attn = _conv1d(cfg, d, 3 * d, ("embed", "heads"), rngs)
        self.c_proj = _conv1d(cfg, d, d, ("heads", "embed"), rngs)

    def __call__(self, x: jax.Array, ctx: decoder.Context, cache: LayerKV | None
                 ) -> tuple[jax.Array, LayerKV | None]:
        b, t, _ = x.shape
        q, k, v = (y.reshape(b, t, self.num_heads, self.head_dim)
                   for y in jnp.split(self.c_attn(x), 3, axis=-1))
        out, cache = self.attend(q, k, v, ctx.mask, cache)
        return self.c_proj(out), cache


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.resolved_intermediate_size
        self.act = layers.activation(cfg.activation)
        self.c_fc = _conv1d(cfg, d, f, ("embed", "mlp"), rngs)
        self.c_proj = _conv1d(cfg, f, d, ("mlp", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(cfg, rngs)
        self.attn = GPT2Attention(cfg, rngs=rngs)
        self.ln_2 = _layer_norm(cfg, rngs)
        self.mlp = GPT2MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, ctx: decoder.Context, cache: LayerKV | None):
        return decoder.pre_norm_block(x, ctx, cache, self.ln_1, self.attn, self.ln_2, self.mlp)


class GPT2Model(decoder.Decoder):
    """The backbone (HF ``GPT2Model``): token ids -> final normalised hidden states ``[B, T, D]``."""

    blocks, final_norm = "h", "ln_f"

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, d, std = _dtypes(cfg), cfg.hidden_size, cfg.initializer_range
        self.wte = layers.Embed(cfg.vocab_size, d, init_std=std, rngs=rngs, **dt)
        self.wpe = layers.Embed(cfg.max_position_embeddings, d, init_std=std,
                                axes=("position", "embed"), rngs=rngs, **dt)
        self.h = stack_layers(lambda r: GPT2Block(cfg, rngs=r), cfg.num_layers, rngs)
        self.ln_f = _layer_norm(cfg, rngs)

    @property
    def embed_tokens(self) -> layers.Embed:
        """The token embedding under the name ``heads.CausalLM`` ties to."""
        return self.wte

    def embed(self, input_ids: jax.Array, positions: jax.Array,
              inputs_embeds: jax.Array | None) -> jax.Array:
        """Token (or given) embeddings plus the learned position embeddings."""
        return super().embed(input_ids, positions, inputs_embeds) + self.wpe(positions)

    def layer_context(self, positions: jax.Array, mask: decoder.MaskFn
                      ) -> tuple[Callable[[Any], decoder.Context], Any]:
        ctx = decoder.Context(positions, mask(None), None)
        return lambda _: ctx, None


def build(cfg: GPT2Config, head: str, num_labels: int, rngs: nnx.Rngs) -> nnx.Module:
    """GPT-2 with a ``heads.py`` head (tied LM head, last-token ``score``, per-token ``score``)."""
    return heads.build(GPT2Model(cfg, rngs=rngs), cfg, head, num_labels, rngs,
                       tie=cfg.tie_embeddings)


# ---------------------------------------------------------------------------------------------
# Hugging Face names and configs
# ---------------------------------------------------------------------------------------------

def hf_weight_map(cfg: GPT2Config, head: str) -> list[weights.WeightSpec]:
    """ftjax paths <-> transformers ``GPT2*`` names (``Conv1D`` weights need no transpose)."""
    W, ln, L = weights.WeightSpec, weights.layer_norm, f"transformer.h.{weights.LAYER}"
    lay = ("model", "h")
    specs = [W(("model", "wte", "embedding"), "transformer.wte.weight"),
             W(("model", "wpe", "embedding"), "transformer.wpe.weight")]
    specs += ln(("model", "ln_f"), "transformer.ln_f")
    for norm in ("ln_1", "ln_2"):
        specs += ln(lay + (norm,), f"{L}.{norm}")
    for mod, name in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
        specs += [W(lay + (mod, name, "kernel"), f"{L}.{mod}.{name}.weight"),
                  W(lay + (mod, name, "bias"), f"{L}.{mod}.{name}.bias")]
    if head == "causal_lm" and not cfg.tie_embeddings:
        specs += weights.linear(("lm_head",), "lm_head", False)
    elif head == "sequence_classification":
        specs += weights.linear(("score",), "score", False)
    elif head == "token_classification":
        specs += weights.linear(("score",), "classifier", True)
    return specs


_HF_KEYS = dict(vocab_size="vocab_size", hidden_size="n_embd", intermediate_size="n_inner",
                num_layers="n_layer", num_heads="n_head", max_position_embeddings="n_positions",
                activation="activation_function", layer_norm_eps="layer_norm_epsilon",
                initializer_range="initializer_range", tie_embeddings="tie_word_embeddings",
                pad_token_id="pad_token_id", bos_token_id="bos_token_id",
                eos_token_id="eos_token_id", model_type="model_type")
_UNSUPPORTED = ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention")


def from_hf_config(hf: dict[str, Any]) -> GPT2Config:
    """A ``GPT2Config`` from a transformers ``config.json`` dict."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"model_type {hf.get('model_type')!r} is not 'gpt2'")
    bad = [k for k in _UNSUPPORTED if hf.get(k)] + ([] if hf.get("scale_attn_weights", True)
                                                   else ["scale_attn_weights=False"])
    if bad:
        raise NotImplementedError(f"GPT-2 options {bad} are not supported")
    return GPT2Config(**{ours: hf[theirs] for ours, theirs in _HF_KEYS.items() if theirs in hf})


def to_hf_config(cfg: GPT2Config) -> dict[str, Any]:
    """A transformers ``config.json`` dict (without ``architectures``) for ``cfg``."""
    return {theirs: getattr(cfg, ours) for ours, theirs in _HF_KEYS.items()}


# name -> architecture kwargs (random init); real sizes follow the published configs.
PRESETS = {
    "tiny-gpt2": dict(vocab_size=50257, hidden_size=64, num_layers=2, num_heads=4,
                      max_position_embeddings=512),
    "gpt2": dict(),
}

registry.register(registry.Family(
    "gpt2", GPT2Config, build, model_types=HF_MODEL_TYPES, hf_weight_map=hf_weight_map,
    from_hf_config=from_hf_config, to_hf_config=to_hf_config, hf_head_suffix=HF_HEAD_SUFFIX,
    token_embedding="wte", embeddings=("wte", "wpe"), lora_targets=r"attn/c_attn$",
    ia3_targets=r"(attn/c_attn|mlp/c_proj)$", ia3_feedforward=r"mlp/c_proj$",
    adapter_targets={"houlsby": r"(attn/c_proj|mlp/c_proj)$", "pfeiffer": r"mlp/c_proj$"},
    presets=PRESETS))
