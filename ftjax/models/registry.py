"""Model families, presets and sharded construction.

A family is one module (``llama.py``, ``bert.py`` ...) that registers a :class:`Family` with
everything family-specific: its config class, how to build each head, the Hugging Face weight map
and config conversion, the default adapter targets, which backbone modules are embeddings, whether
attention is causal (for the FLOP count) and its presets. Families are found by importing the
modules of ``ftjax.models`` the first time the registry is read, so adding a family is one new
module (and its parity test). ``init_sharded`` creates parameters straight into their mesh layout:
``eval_shape`` -> shardings -> ``jit(init, out_shardings=...)``.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Iterator, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh

from ftjax import discovery, sharding


# head -> suffix of the transformers class name (a family may override, e.g. GPT2LMHeadModel).
HF_HEAD_SUFFIX: dict[str, str] = {"causal_lm": "ForCausalLM",
                                  "sequence_classification": "ForSequenceClassification",
                                  "token_classification": "ForTokenClassification"}


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build one model family with each of its heads, and how it maps to transformers.

    The config class must have a ``model_type`` field (the transformers ``model_type``). Targets
    are regexes over module paths (``model/layers/self_attn/q_proj``).
    """
    name: str
    config_cls: type
    build: Callable[..., nnx.Module]  # build(cfg, head, num_labels, rngs) -> module
    model_types: Mapping[str, str] = dataclasses.field(default_factory=dict)  # HF type -> class prefix
    hf_weight_map: Callable[[Any, str], list] | None = None  # (cfg, head) -> [WeightSpec]
    from_hf_config: Callable[[dict], Any] | None = None  # config.json dict -> cfg
    to_hf_config: Callable[[Any], dict] | None = None  # cfg -> config.json dict
    hf_head_suffix: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(HF_HEAD_SUFFIX))
    causal: bool = True  # causal attention (the FLOP count halves the attention term)
    token_embedding: str = "embed_tokens"  # the token table's module path under the backbone
    embeddings: tuple[str, ...] = ("embed_tokens",)  # backbone modules below the blocks
    lora_targets: str = r"(q_proj|v_proj)$"  # LoRA's default (PEFT's for Llama-like models)
    ia3_targets: str = r"(k_proj|v_proj|down_proj)$"
    ia3_feedforward: str = r"down_proj$"  # of the IA3 targets, those scaled on their input
    adapter_targets: Mapping[str, str] = dataclasses.field(default_factory=lambda: {
        "houlsby": r"(self_attn/o_proj|mlp/down_proj)$", "pfeiffer": r"mlp/down_proj$"})
    presets: Mapping[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # name -> cfg kwargs

    def hf_architecture(self, cfg: Any, head: str) -> str:
        """The transformers class name, e.g. ``Qwen2ForSequenceClassification``."""
        return self.model_types[cfg.model_type] + self.hf_head_suffix[head]

    def head_for_architecture(self, architecture: str) -> str | None:
        """The ftjax head of a transformers class name (``BertForMaskedLM`` -> ``masked_lm``)."""
        for prefix in self.model_types.values():
            for head, suffix in self.hf_head_suffix.items():
                if architecture == prefix + suffix:
                    return head
        return None


_FAMILIES: dict[str, Family] = {}
_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {}


def register(family: Family) -> Family:
    """Add ``family`` and its presets (called by the family's own module at import)."""
    _FAMILIES[family.name] = family
    for name, kwargs in family.presets.items():
        if _PRESETS.get(name, (family.name,))[0] != family.name:
            raise ValueError(f"preset {name!r} is defined by two families")
        _PRESETS[name] = (family.name, dict(kwargs))
    return family


def _discover() -> None:
    discovery.import_all("ftjax.models")


class _Registered(Mapping):
    """A read-only view of a registry table that finds the families on first use."""

    def __init__(self, table: dict):
        self._table = table

    def __getitem__(self, key: str) -> Any:
        _discover()
        return self._table[key]

    def __iter__(self) -> Iterator[str]:
        _discover()
        return iter(self._table)

    def __len__(self) -> int:
        _discover()
        return len(self._table)


FAMILIES: Mapping[str, Family] = _Registered(_FAMILIES)
# name -> (family, architecture kwargs). Real sizes follow the published configs.
PRESETS: Mapping[str, tuple[str, dict[str, Any]]] = _Registered(_PRESETS)


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


def family_of(model: nnx.Module) -> Family:
    """The family of a headed model (its backbone's ``cfg``)."""
    return family_for_config(model.model.cfg)


def head_of(model: nnx.Module) -> str:
    """Which head ``model`` is: every headed model class says so in its ``head`` attribute."""
    head = getattr(type(model), "head", None)
    if not isinstance(head, str):
        raise ValueError(f"cannot tell the head of {type(model).__name__}; pass head=...")
    return head


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
