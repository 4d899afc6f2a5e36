"""Model families, presets and sharded construction.

A family knows its config class and how to build a model with a given head. A preset is a named
architecture (random init) at a real or a tiny size. ``init_sharded`` creates parameters straight
into their mesh layout: ``eval_shape`` -> shardings -> ``jit(init, out_shardings=...)``.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from ftjax import sharding
from ftjax.models import bert, gemma, gpt2, heads, llama


# head -> suffix of the transformers class name (a family may override, e.g. GPT2LMHeadModel).
HF_HEAD_SUFFIX: dict[str, str] = {"causal_lm": "ForCausalLM",
                                  "sequence_classification": "ForSequenceClassification",
                                  "token_classification": "ForTokenClassification"}


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build one model family with each of its heads, and how it maps to transformers.

    The config class must have a ``model_type`` field (the transformers ``model_type``).
    """
    name: str
    config_cls: type
    build: Callable[..., nnx.Module]  # build(cfg, head, num_labels, rngs) -> module
    model_types: Mapping[str, str] = dataclasses.field(default_factory=dict)  # HF type -> class prefix
    hf_weight_map: Callable[[Any, str], list] | None = None  # (cfg, head) -> [WeightSpec]
    from_hf_config: Callable[[dict], Any] | None = None  # config.json dict -> cfg
    to_hf_config: Callable[[Any], dict] | None = None  # cfg -> config.json dict
    hf_head_suffix: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(HF_HEAD_SUFFIX))

    def hf_architecture(self, cfg: Any, head: str) -> str:
        """The transformers class name, e.g. ``Qwen2ForSequenceClassification``."""
        return self.model_types[cfg.model_type] + self.hf_head_suffix[head]


def build_llama(cfg: llama.LlamaConfig, head: str, num_labels: int, rngs: nnx.Rngs) -> nnx.Module:
    dt = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    backbone = llama.LlamaModel(cfg, rngs=rngs)
    if head == "causal_lm":
        return heads.CausalLM(backbone, cfg.hidden_size, cfg.vocab_size, tie=cfg.tie_embeddings,
                              init_std=cfg.initializer_range, rngs=rngs, **dt)
    if head == "sequence_classification":
        return heads.SequenceClassifier(backbone, cfg.hidden_size, num_labels,
                                        pad_token_id=cfg.pad_token_id,
                                        init_std=cfg.initializer_range, rngs=rngs, **dt)
    if head == "token_classification":
        return heads.TokenClassifier(backbone, cfg.hidden_size, num_labels,
                                     init_std=cfg.initializer_range, rngs=rngs, **dt)
    raise ValueError(f"unknown head {head!r}; choose from {heads.HEADS}")


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", llama.LlamaConfig, build_llama, model_types=llama.HF_MODEL_TYPES,
                    hf_weight_map=llama.hf_weight_map, from_hf_config=llama.from_hf_config,
                    to_hf_config=llama.to_hf_config),
    "bert": Family("bert", bert.BertConfig, bert.build, model_types=bert.HF_MODEL_TYPES,
                   hf_weight_map=bert.hf_weight_map, from_hf_config=bert.from_hf_config,
                   to_hf_config=bert.to_hf_config, hf_head_suffix=bert.HF_HEAD_SUFFIX),
    "gpt2": Family("gpt2", gpt2.GPT2Config, gpt2.build, model_types=gpt2.HF_MODEL_TYPES,
                   hf_weight_map=gpt2.hf_weight_map, from_hf_config=gpt2.from_hf_config,
                   to_hf_config=gpt2.to_hf_config, hf_head_suffix=gpt2.HF_HEAD_SUFFIX),
    "gemma": Family("gemma", gemma.GemmaConfig, gemma.build, model_types=gemma.HF_MODEL_TYPES,
                    hf_weight_map=gemma.hf_weight_map, from_hf_config=gemma.from_hf_config,
                    to_hf_config=gemma.to_hf_config),
}


def family_for_model_type(model_type: str) -> Family:
    """The family that reads transformers ``model_type``; the error lists the supported ones."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {supported}")


def family_for_config(cfg: Any) -> Family:
    """The family whose config class ``cfg`` is."""
    for family in FAMILIES.values():
        if isinstance(cfg, family.config_cls):
            return family
    raise ValueError(f"no model family uses config class {type(cfg).__name__}")


# name -> (family, architecture kwargs). Real sizes follow the published configs.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-bert": ("bert", dict(vocab_size=30522, hidden_size=64, intermediate_size=128,
                               num_layers=2, num_heads=4)),
    "bert-base": ("bert", dict()),
    "tiny-gpt2": ("gpt2", dict(vocab_size=50257, hidden_size=64, num_layers=2, num_heads=4,
                               max_position_embeddings=512)),
    "gpt2": ("gpt2", dict()),
    "tiny-gemma2": ("gemma", dict(vocab_size=256000, hidden_size=64, intermediate_size=128,
                                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                  query_pre_attn_scalar=16, attn_logit_softcap=50.0,
                                  final_logit_softcap=30.0, sliding_window=64,
                                  layer_types=gemma.layer_pattern(2, 2), model_type="gemma2")),
    "gemma-2b": ("gemma", dict()),
    "gemma2-9b": ("gemma", dict(hidden_size=3584, intermediate_size=14336, num_layers=42,
                                num_heads=16, num_kv_heads=8, query_pre_attn_scalar=256,
                                attn_logit_softcap=50.0, final_logit_softcap=30.0,
                                sliding_window=4096, layer_types=gemma.layer_pattern(42, 2),
                                model_type="gemma2")),
    "gemma3-1b": ("gemma", dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                                num_layers=26, num_heads=4, num_kv_heads=1, rope_theta=1e6,
                                rope_local_theta=1e4, query_pre_attn_scalar=256,
                                sliding_window=512, layer_types=gemma.layer_pattern(26, 6),
                                max_position_embeddings=32768, model_type="gemma3_text")),
    "all-minilm-l6": ("bert", dict(hidden_size=384, intermediate_size=1536, num_layers=6)),
    "roberta-base": ("bert", dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                  layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                                  eos_token_id=2, model_type="roberta")),
    "tiny-llama": ("llama", dict(vocab_size=30522, hidden_size=64, intermediate_size=128,
                                 num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=512,
                                 tie_embeddings=True, pad_token_id=0)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_layers=30, num_heads=9, num_kv_heads=3, rope_theta=100000.0,
                                   rms_norm_eps=1e-5, tie_embeddings=True, max_position_embeddings=8192,
                                   bos_token_id=1, eos_token_id=2)),
    "llama3-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                                rope_theta=500000.0, rms_norm_eps=1e-5, tie_embeddings=True,
                                max_position_embeddings=131072,
                                rope_scaling=(("rope_type", "llama3"), ("factor", 32.0),
                                              ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                                              ("original_max_position_embeddings", 8192)))),
    "llama3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0,
                                rms_norm_eps=1e-5, max_position_embeddings=8192)),
    "mistral-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                 num_layers=32, num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5,
                                 sliding_window=4096, max_position_embeddings=32768,
                                 model_type="mistral")),
    "qwen2.5-7b": ("llama", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                 num_layers=28, num_heads=28, num_kv_heads=4, rope_theta=1000000.0,
                                 attention_bias=True, max_position_embeddings=32768,
                                 model_type="qwen2")),
}


def get_preset(name: str) -> tuple[Family, Any]:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
    family, kwargs = PRESETS[name]
    return FAMILIES[family], FAMILIES[family].config_cls(**kwargs)


def init_sharded(build: Callable[[nnx.Rngs], nnx.Module], mesh: Mesh, seed: int = 0) -> nnx.Module:
    """Create a model whose parameters are born sharded on ``mesh`` (never whole on one device)."""
    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = sharding.state_shardings(abstract_state, mesh)

    @partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.split(build(nnx.Rngs(seed)))[1]

    return nnx.merge(graphdef, init())


def count_params(model_or_state: Any) -> int:
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return sum(int(x.size) for x in jax.tree.leaves(state))
