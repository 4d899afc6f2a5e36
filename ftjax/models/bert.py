"""BERT and RoBERTa encoders (one module tree; ``model_type`` picks the variant).

Post-LN transformer with learned absolute positions and token-type embeddings. RoBERTa differs
only in its position ids (``cumsum`` of the non-pad mask, offset by the padding index), its
classification head and the HF names of its heads. Below the backbone, parameter paths mirror
the HF module tree (``encoder.layer.N.attention.self.query``, layers stacked on a leading axis);
every head keeps the backbone at ``model`` (HF: ``bert.`` / ``roberta.`` / bare for BertModel).

Dropout is opt-in (``dropout > 0``) and active only in the train step, which installs a fresh key
per step (``layers.set_dropout_key``); scanned layers receive their keys as per-layer inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import sharding
from ftjax.models import layers, registry, weights
from ftjax.models.stack import run_layers, stack_layers

HF_MODEL_TYPES = {"bert": "Bert", "roberta": "Roberta"}  # transformers model_type -> class prefix
# ftjax head -> transformers class suffix ("encoder" is the bare BertModel, last_hidden_state)
HF_HEAD_SUFFIX = {"encoder": "Model", "sequence_classification": "ForSequenceClassification",
                  "token_classification": "ForTokenClassification", "masked_lm": "ForMaskedLM"}
HEADS = tuple(HF_HEAD_SUFFIX)
POOLINGS = ("pooler", "cls", "mean")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    pad_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    model_type: str = "bert"  # "roberta": padding-offset positions and RoBERTa heads
    dropout: float = 0.0  # hidden + classifier dropout, active only in the train step
    # What a BERT sequence classifier classifies: HF's pooler (tanh(dense([CLS]))), the [CLS]
    # state itself, or the mean over real tokens (sentence-transformers checkpoints say which).
    pooling: str = "pooler"  # pooler | cls | mean
    # runtime switches (not architecture)
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"

    @property
    def is_roberta(self) -> bool:
        return self.model_type == "roberta"

    @property
    def hf_prefix(self) -> str:
        """transformers' ``base_model_prefix``: the backbone's name inside a head model."""
        return "roberta" if self.is_roberta else "bert"


def _dtypes(cfg: BertConfig) -> dict:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _linear(cfg: BertConfig, d_in: int, d_out: int, axes, rngs: nnx.Rngs) -> layers.Linear:
    return layers.Linear(d_in, d_out, axes=axes, use_bias=True, init_std=cfg.initializer_range,
                         rngs=rngs, **_dtypes(cfg))


def _layer_norm(cfg: BertConfig, rngs: nnx.Rngs) -> layers.LayerNorm:
    return layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs, **_dtypes(cfg))


def _dropout(cfg: BertConfig) -> layers.Dropout | None:
    return layers.Dropout(cfg.dropout) if cfg.dropout else None


def _apply_dropout(drop: layers.Dropout | None, x: jax.Array, salt: int = 0) -> jax.Array:
    return x if drop is None else drop(x, salt)


def roberta_positions(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """transformers' ``create_position_ids_from_input_ids``: pads keep ``pad_token_id``."""
    keep = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(keep, axis=1) * keep + pad_token_id


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        dt, d, std = _dtypes(cfg), cfg.hidden_size, cfg.initializer_range
        self.word_embeddings = layers.Embed(cfg.vocab_size, d, init_std=std, rngs=rngs, **dt)
        self.position_embeddings = layers.Embed(cfg.max_position_embeddings, d, init_std=std,
                                                axes=("position", "embed"), rngs=rngs, **dt)
        self.token_type_embeddings = layers.Embed(cfg.type_vocab_size, d, init_std=std,
                                                  axes=("token_type", "embed"), rngs=rngs, **dt)
        self.LayerNorm = _layer_norm(cfg, rngs)

    def __call__(self, input_ids, positions, token_type_ids, inputs_embeds):
        h = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        h = h + self.token_type_embeddings(token_type_ids) + self.position_embeddings(positions)
        return self.LayerNorm(h)


class BertSelfAttention(layers.PrefixHook, nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, d // cfg.num_heads
        self.query = _linear(cfg, d, d, ("embed", "heads"), rngs)
        self.key = _linear(cfg, d, d, ("embed", "heads"), rngs)
        self.value = _linear(cfg, d, d, ("embed", "heads"), rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        q, k, v = (p(x).reshape(b, t, self.num_heads, self.head_dim)
                   for p in (self.query, self.key, self.value))
        out = layers.dot_product_attention(q, k, v, mask, scale=self.head_dim ** -0.5,
                                           prefix=self.prefix_kv())
        return out.reshape(b, t, -1)


class BertResidualOutput(nnx.Module):
    """``LayerNorm(x + dropout(dense(h)))``: HF's ``BertSelfOutput`` and ``BertOutput``."""

    def __init__(self, cfg: BertConfig, d_in: int, in_axis: str, *, rngs: nnx.Rngs):
        self.rate = cfg.dropout
        self.dense = _linear(cfg, d_in, cfg.hidden_size, (in_axis, "embed"), rngs)
        self.LayerNorm = _layer_norm(cfg, rngs)

    def __call__(self, h: jax.Array, x: jax.Array, key: jax.Array | None) -> jax.Array:
        return self.LayerNorm(x + layers.dropout(self.dense(h), self.rate, key))


class BertAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.self = BertSelfAttention(cfg, rngs=rngs)
        self.output = BertResidualOutput(cfg, cfg.hidden_size, "heads", rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, key: jax.Array | None) -> jax.Array:
        return self.output(self.self(x, mask), x, key)


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.act = layers.activation(cfg.hidden_act)
        self.dense = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.act(self.dense(x))


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.attention = BertAttention(cfg, rngs=rngs)
        self.intermediate = BertIntermediate(cfg, rngs=rngs)
        self.output = BertResidualOutput(cfg, cfg.intermediate_size, "mlp", rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, keys: jax.Array | None) -> jax.Array:
        k_attn, k_mlp = (None, None) if keys is None else (keys[0], keys[1])
        x = self.attention(x, mask, k_attn)
        x = self.output(self.intermediate(x), x, k_mlp)
        return sharding.constrain(x, "batch", "act_seq", "act_embed")


class BertEncoder(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.layer = stack_layers(lambda r: BertLayer(cfg, rngs=r), cfg.num_layers, rngs)


class BertPooler(nnx.Module):
    """``tanh(dense(h[:, 0]))`` on the first ([CLS] / <s>) token."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "embed"), rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(h[:, 0]))


class BertModel(nnx.Module):
    """The backbone (HF ``BertModel``/``RobertaModel``): ids -> ``last_hidden_state [B, T, D]``.

    ``pooler`` adds HF's pooler; ``pool(hidden)`` applies it.
    """

    def __init__(self, cfg: BertConfig, *, pooler: bool = True, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg, rngs=rngs)
        self.encoder = BertEncoder(cfg, rngs=rngs)
        self.pooler = BertPooler(cfg, rngs=rngs) if pooler else None
        self.dropout = _dropout(cfg)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 inputs_embeds: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        if positions is None and cfg.is_roberta:
            positions = roberta_positions(input_ids, cfg.pad_token_id)
        positions, segment_ids = layers.default_positions_and_segments(
            input_ids, attention_mask, positions, segment_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        mask = layers.attention_mask(segment_ids, segment_ids, positions, positions, causal=False)
        h = self.embeddings(input_ids, positions, token_type_ids, inputs_embeds)
        h = sharding.constrain(_apply_dropout(self.dropout, h), "batch", "act_seq", "act_embed")
        keys = None
        if self.dropout is not None:
            keys = self.dropout.keys((cfg.num_layers, 2))
        return run_layers(self.encoder.layer, h, lambda blk, x, k: blk(x, mask, k),
                          scan=cfg.scan_layers, remat=cfg.remat, per_layer=keys)

    def pool(self, hidden: jax.Array) -> jax.Array:
        """HF's ``pooler_output``."""
        if self.pooler is None:
            raise ValueError("this backbone was built without a pooler")
        return self.pooler(hidden)


class BertEncoderModel(nnx.Module):
    """The ``encoder`` head: HF ``BertModel``/``RobertaModel`` (with pooler) under ``model``."""

    head = "encoder"

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.model = BertModel(cfg, pooler=True, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                 inputs_embeds=None, token_type_ids=None) -> jax.Array:
        return self.model(input_ids, attention_mask, positions, segment_ids, inputs_embeds,
                          token_type_ids)

    def pool(self, hidden: jax.Array) -> jax.Array:
        """HF's ``pooler_output`` from ``last_hidden_state``."""
        return self.model.pool(hidden)


class RobertaClassificationHead(nnx.Module):
    """dropout -> dense -> tanh -> dropout -> out_proj on the <s> token."""

    def __init__(self, cfg: BertConfig, num_labels: int, *, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "embed"), rngs)
        self.out_proj = _linear(cfg, cfg.hidden_size, num_labels, ("embed", "labels"), rngs)
        self.dropout = _dropout(cfg)

    def __call__(self, h: jax.Array) -> jax.Array:
        x = jnp.tanh(self.dense(_apply_dropout(self.dropout, h[:, 0])))
        return self.out_proj(_apply_dropout(self.dropout, x, salt=1))


class BertForSequenceClassification(nnx.Module):
    """BERT: pooler -> dropout -> ``classifier``; RoBERTa: ``classifier`` head on <s>."""

    head = "sequence_classification"

    def __init__(self, cfg: BertConfig, num_labels: int, *, rngs: nnx.Rngs):
        if cfg.pooling not in POOLINGS or (cfg.is_roberta and cfg.pooling != "pooler"):
            raise ValueError(f"pooling={cfg.pooling!r} for {cfg.model_type}; choose from "
                             f"{POOLINGS if not cfg.is_roberta else ('pooler',)} (RoBERTa's "
                             "classification head pools <s> itself)")
        self.model = BertModel(cfg, pooler=not cfg.is_roberta, rngs=rngs)
        if cfg.is_roberta:
            self.classifier = RobertaClassificationHead(cfg, num_labels, rngs=rngs)
            self.dropout = None
        else:
            self.classifier = _linear(cfg, cfg.hidden_size, num_labels, ("embed", "labels"), rngs)
            self.dropout = _dropout(cfg)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                 inputs_embeds=None, token_type_ids=None) -> jax.Array:
        h = self.model(input_ids, attention_mask, positions, segment_ids, inputs_embeds,
                          token_type_ids)
        if isinstance(self.classifier, RobertaClassificationHead):
            return self.classifier(h)
        return self.classifier(_apply_dropout(self.dropout, self.pooled(h, attention_mask, segment_ids)))

    def pooled(self, h: jax.Array, attention_mask: jax.Array | None,
               segment_ids: jax.Array | None) -> jax.Array:
        """``[B, D]`` per ``cfg.pooling``; ``mean`` averages the real (mask 1 / segment > 0) tokens."""
        pooling = self.model.cfg.pooling
        if pooling == "pooler":
            return self.model.pool(h)
        if pooling == "cls":
            return h[:, 0]
        keep = (attention_mask if attention_mask is not None else segment_ids > 0
                if segment_ids is not None else jnp.ones(h.shape[:2]))
        keep = keep.astype(h.dtype)[..., None]
        return jnp.sum(h * keep, axis=1) / jnp.maximum(jnp.sum(keep, axis=1), 1e-9)


class BertForTokenClassification(nnx.Module):
    """backbone -> dropout -> per-token ``classifier``."""

    head = "token_classification"

    def __init__(self, cfg: BertConfig, num_labels: int, *, rngs: nnx.Rngs):
        self.model = BertModel(cfg, pooler=False, rngs=rngs)
        self.classifier = _linear(cfg, cfg.hidden_size, num_labels, ("embed", "labels"), rngs)
        self.dropout = _dropout(cfg)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                 inputs_embeds=None, token_type_ids=None) -> jax.Array:
        h = self.model(input_ids, attention_mask, positions, segment_ids, inputs_embeds,
                          token_type_ids)
        return self.classifier(_apply_dropout(self.dropout, h))


class MaskedLMHead(nnx.Module):
    """dense -> act -> LayerNorm -> tied decoder (+ bias). HF: ``cls.predictions`` / ``lm_head``."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.act = layers.activation("gelu" if cfg.is_roberta else cfg.hidden_act)
        self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "embed"), rngs)
        self.layer_norm = _layer_norm(cfg, rngs)
        self.bias = layers.param(rngs, layers.zeros, (cfg.vocab_size,), jnp.dtype(cfg.param_dtype),
                                 ("vocab",))

    def __call__(self, h: jax.Array, embed: layers.Embed) -> jax.Array:
        x = self.layer_norm(self.act(self.dense(h)))
        return embed.attend(x) + self.bias[...].astype(x.dtype)


class BertForMaskedLM(nnx.Module):
    """backbone -> ``lm_head`` with the decoder tied to the word embeddings."""

    head = "masked_lm"
    ties_input_embedding = True  # the decoder is the word-embedding table

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.model = BertModel(cfg, pooler=False, rngs=rngs)
        self.lm_head = MaskedLMHead(cfg, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                 inputs_embeds=None, token_type_ids=None) -> jax.Array:
        h = self.model(input_ids, attention_mask, positions, segment_ids, inputs_embeds,
                          token_type_ids)
        return self.lm_head(h, self.model.embeddings.word_embeddings)


def build(cfg: BertConfig, head: str, num_labels: int, rngs: nnx.Rngs) -> nnx.Module:
    """The model for ``head``; every head keeps the backbone at ``model`` (like heads.py)."""
    if head == "encoder":
        return BertEncoderModel(cfg, rngs=rngs)
    if head == "sequence_classification":
        return BertForSequenceClassification(cfg, num_labels, rngs=rngs)
    if head == "token_classification":
        return BertForTokenClassification(cfg, num_labels, rngs=rngs)
    if head == "masked_lm":
        return BertForMaskedLM(cfg, rngs=rngs)
    raise ValueError(f"unknown head {head!r} for {cfg.model_type}; choose from {HEADS}")


# ---------------------------------------------------------------------------------------------
# Hugging Face names and configs
# ---------------------------------------------------------------------------------------------

def hf_weight_map(cfg: BertConfig, head: str) -> list[weights.WeightSpec]:
    """ftjax paths <-> HF names; ``encoder`` uses bare ``BertModel`` names (no ``bert.`` prefix)."""
    W, lin, ln = weights.WeightSpec, weights.linear, weights.layer_norm
    bare = head == "encoder"
    hf0 = "" if bare else f"{cfg.hf_prefix}."
    emb, lay = ("model", "embeddings"), ("model", "encoder", "layer")
    L = f"{hf0}encoder.layer.{weights.LAYER}"
    specs = [W(emb + (name, "embedding"), f"{hf0}embeddings.{name}.weight")
             for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    specs += ln(emb + ("LayerNorm",), f"{hf0}embeddings.LayerNorm")
    for name in ("query", "key", "value"):
        specs += lin(lay + ("attention", "self", name), f"{L}.attention.self.{name}", True)
    specs += lin(lay + ("attention", "output", "dense"), f"{L}.attention.output.dense", True)
    specs += ln(lay + ("attention", "output", "LayerNorm"), f"{L}.attention.output.LayerNorm")
    specs += lin(lay + ("intermediate", "dense"), f"{L}.intermediate.dense", True)
    specs += lin(lay + ("output", "dense"), f"{L}.output.dense", True)
    specs += ln(lay + ("output", "LayerNorm"), f"{L}.output.LayerNorm")
    if bare or (head == "sequence_classification" and not cfg.is_roberta):
        specs += lin(("model", "pooler", "dense"), f"{hf0}pooler.dense", True)
    if head == "sequence_classification" and cfg.is_roberta:
        specs += lin(("classifier", "dense"), "classifier.dense", True)
        specs += lin(("classifier", "out_proj"), "classifier.out_proj", True)
    elif head in ("sequence_classification", "token_classification"):
        specs += lin(("classifier",), "classifier", True)
    elif head == "masked_lm":
        hf = "lm_head" if cfg.is_roberta else "cls.predictions"
        dense, norm = ("dense", "layer_norm") if cfg.is_roberta else ("transform.dense", "transform.LayerNorm")
        specs += lin(("lm_head", "dense"), f"{hf}.{dense}", True)
        specs += ln(("lm_head", "layer_norm"), f"{hf}.{norm}")
        specs.append(W(("lm_head", "bias"), f"{hf}.bias"))
    return specs


SENTENCE_POOLING = "sentence_transformers_pooling"  # key loading adds for a 1_Pooling folder
_HF_KEYS = dict(vocab_size="vocab_size", hidden_size="hidden_size",
                intermediate_size="intermediate_size", num_layers="num_hidden_layers",
                num_heads="num_attention_heads", max_position_embeddings="max_position_embeddings",
                type_vocab_size="type_vocab_size", layer_norm_eps="layer_norm_eps",
                hidden_act="hidden_act", initializer_range="initializer_range",
                pad_token_id="pad_token_id", bos_token_id="bos_token_id",
                eos_token_id="eos_token_id", model_type="model_type")


def from_hf_config(hf: dict[str, Any]) -> BertConfig:
    """A ``BertConfig`` from a transformers ``config.json`` dict (``bert`` or ``roberta``)."""
    if hf.get("model_type") not in HF_MODEL_TYPES:
        raise ValueError(f"model_type {hf.get('model_type')!r} is not a BERT family type "
                         f"{sorted(HF_MODEL_TYPES)}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise NotImplementedError("only absolute position embeddings are supported")
    kwargs = {ours: hf[theirs] for ours, theirs in _HF_KEYS.items() if theirs in hf}
    st = hf.get(SENTENCE_POOLING) or {}  # sentence-transformers' 1_Pooling/config.json
    if st.get("pooling_mode_mean_tokens"):
        kwargs["pooling"] = "mean"
    elif st.get("pooling_mode_cls_token"):
        kwargs["pooling"] = "cls"
    return BertConfig(**kwargs)


def to_hf_config(cfg: BertConfig) -> dict[str, Any]:
    """A transformers ``config.json`` dict (without ``architectures``) for ``cfg``."""
    out = {theirs: getattr(cfg, ours) for ours, theirs in _HF_KEYS.items()}
    out.update(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
               position_embedding_type="absolute", tie_word_embeddings=True)
    return out


# name -> architecture kwargs (random init); real sizes follow the published configs.
PRESETS = {
    "tiny-bert": dict(vocab_size=30522, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4),
    "bert-base": dict(),
    "all-minilm-l6": dict(hidden_size=384, intermediate_size=1536, num_layers=6),
    "roberta-base": dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                         layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2, model_type="roberta"),
}

registry.register(registry.Family(
    "bert", BertConfig, build, model_types=HF_MODEL_TYPES, hf_weight_map=hf_weight_map,
    from_hf_config=from_hf_config, to_hf_config=to_hf_config, hf_head_suffix=HF_HEAD_SUFFIX,
    causal=False, token_embedding="embeddings/word_embeddings", embeddings=("embeddings",),
    lora_targets=r"(self/query|self/value)$", ia3_targets=r"(self/key|self/value|layer/output/dense)$",
    ia3_feedforward=r"layer/output/dense$",
    adapter_targets={"houlsby": r"output/dense$", "pfeiffer": r"layer/output/dense$"},
    presets=PRESETS))
