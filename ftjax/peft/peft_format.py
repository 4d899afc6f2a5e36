"""Adapters in Hugging Face PEFT's own format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor names are PEFT's (``base_model.model.<HF module>.lora_A.weight``, ``...ia3_l``,
``prompt_embeddings``), derived from the family's ``hf_weight_map`` so a name is written once.
Stacked adapters are written per layer. Target modules are written as an exact regex over HF
module names, so PEFT adapts exactly the layers ftjax adapted. A trained classifier head goes in
as PEFT's ``modules_to_save``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from ftjax.models import registry, weights
from ftjax.peft import freezing, registry as methods, surgery
from ftjax.peft.config import method_config
from ftjax.peft.plan import MethodPlan, apply_method, train_head

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # tensors of tuner methods (LoRA, IA3): PeftModel -> LoraModel -> model
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS",
              "token_classification": "TOKEN_CLS", "encoder": "FEATURE_EXTRACTION"}


def exportable() -> tuple[str, ...]:
    """The methods PEFT has a format for."""
    return tuple(m.name for m in methods.methods() if m.peft is not None)


# ---------------------------------------------------------------------------------------------
# ftjax paths <-> HF module names
# ---------------------------------------------------------------------------------------------

def _head_specs(model: nnx.Module) -> tuple[str, list[weights.WeightSpec]]:
    """(head, weight map) of ``model``: the head whose own parameters are exactly the model's."""
    cfg = model.model.cfg
    family = registry.family_for_config(cfg)
    have = {tuple(p) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if freezing.is_head(tuple(p)) and not isinstance(v, surgery.AdapterParam)}
    for head in family.hf_head_suffix:
        specs = family.hf_weight_map(cfg, head)
        if {s.path for s in specs if freezing.is_head(s.path)} == have:
            return head, specs
    raise ValueError(f"cannot tell the head of {type(model).__name__} for PEFT names")


def module_names(specs: list[weights.WeightSpec]) -> dict[tuple, str]:
    """ftjax Linear (and norm) path -> HF module name (``{layer}`` in it when stacked)."""
    return {s.path[:-1]: s.hf_name[:-len(".weight")] for s in specs
            if s.path[-1] in ("kernel", "scale") and s.hf_name.endswith(".weight")}


def _per_layer(name: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    if weights.LAYER not in name:
        return [(name, value)]
    return [(name.replace(weights.LAYER, str(i)), v) for i, v in enumerate(value)]


def _exact_regex(names: list[str]) -> str:
    alts = sorted(re.escape(n).replace(re.escape(weights.LAYER), r"\d+") for n in names)
    return "(" + "|".join(alts) + ")"


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------

def _peft_modules(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """``(path, module)`` of every module holding PEFT tensors (``()``: the model itself)."""
    return [(tuple(p), m) for p, m in nnx.iter_graph(model)
            if isinstance(m, nnx.Module) and hasattr(type(m), "peft_tensors")]


def _key(names: dict[tuple, str], path: tuple, suffix: str) -> str:
    """PEFT's tensor name: a tuner layer's under its HF module, a model-level one (or one a layer
    names in full, such as VeRA's shared ``base_model.vera_A``) bare."""
    if path and not suffix.startswith("base_model."):
        return f"{PREFIX}{names[path]}.{suffix}"
    return suffix


def _method(kind: str) -> methods.Method:
    method = methods.get(kind)
    if method.peft is None:
        raise ValueError(f"PEFT has no format for method {kind!r}; exportable: {exportable()}")
    return method


def export_peft(model: nnx.Module, method_cfg: ml_collections.ConfigDict, out_dir: str | Path,
                base_model_name_or_path: str | None = None) -> Path:
    """Write ``model``'s adapters as a PEFT folder that ``peft.PeftModel.from_pretrained`` loads."""
    from safetensors.numpy import save_file
    fmt = _method(method_cfg.kind).peft
    head, specs = _head_specs(model)
    names = module_names(specs)
    found = _peft_modules(model)
    regex = lambda paths: _exact_regex([names[p] for p in paths])
    config: dict[str, Any] = dict(task_type=TASK_TYPES[head], inference_mode=True,
                                  base_model_name_or_path=base_model_name_or_path, revision=None,
                                  peft_type=fmt.peft_type)
    config.update(fmt.config_fn(model, method_cfg, found, regex))
    tensors: dict[str, np.ndarray] = {}
    for path, module in found:
        for suffix, value in module.peft_tensors().items():
            name = _key(names, path, suffix)
            tensors.update(_per_layer(name, value))
    saved = []
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    if train_head(model, method_cfg):
        for spec in specs:
            if freezing.is_head(spec.path):
                tensors[fmt.head_prefix + spec.hf_name] = spec.to_hf(surgery.host(state[spec.path]))
                saved.append(spec.hf_name.rsplit(".", 1)[0])
    config["modules_to_save"] = sorted(set(saved)) or None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / WEIGHTS_FILE))
    return out


# ---------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------

def _matches(rule: Any, name: str) -> bool:
    """PEFT's target rule: a regex string (full match) or a list of names / dotted suffixes."""
    if not rule:
        return False
    if isinstance(rule, str):
        return re.fullmatch(rule, name) is not None
    return any(name == t or name.endswith("." + t) for t in rule)


def _selected(names: dict[tuple, str], rule: Any, num_layers: int) -> list[tuple]:
    """ftjax paths whose HF modules the rule selects (all layers of a stacked module, or none)."""
    out = []
    for path, name in names.items():
        hits = {_matches(rule, n) for n, _ in _per_layer(name, range(num_layers))}
        if len(hits) > 1:
            raise ValueError(f"PEFT targets only some layers of {name}; ftjax adapts whole stacks")
        if hits == {True}:
            out.append(path)
    return out


def _path_regex(paths: list[tuple]) -> str:
    if not paths:
        return "^$"
    return "^(" + "|".join(re.escape(surgery.path_str(p)) for p in paths) + ")$"


def method_from_peft(config: dict, model: nnx.Module) -> ml_collections.ConfigDict:
    """The ``config.method`` equivalent of a PEFT ``adapter_config.json`` for ``model``."""
    kind = config["peft_type"]
    formats = {m.peft.peft_type: m.peft for m in methods.methods() if m.peft is not None}
    if kind not in formats:
        raise ValueError(f"PEFT type {kind!r} is not supported ({', '.join(sorted(formats))})")
    names = module_names(_head_specs(model)[1])
    num_layers = freezing.num_layers(model)
    m = method_config()
    m.update(formats[kind].method_fn(config, lambda rule: _path_regex(_selected(names, rule, num_layers))))
    m.train_head = "true" if config.get("modules_to_save") else "false"
    return m


def import_peft(model: nnx.Module, adapter_dir: str | Path, tokenizer: Any = None) -> MethodPlan:
    """Apply the PEFT adapter in ``adapter_dir`` to ``model``; returns the ``MethodPlan``."""
    from safetensors.numpy import load_file
    folder = Path(adapter_dir)
    config = json.loads((folder / CONFIG_FILE).read_text())
    tensors = {k.replace(".default.", "."): v for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    head, specs = _head_specs(model)
    names = module_names(specs)
    method = method_from_peft(config, model)
    plan = apply_method(model, method, tokenizer)
    used: set[str] = set()
    num_layers = freezing.num_layers(model)

    def reader(path: tuple):
        def read(suffix: str, transform) -> np.ndarray:
            name = _key(names, path, suffix)
            if not path:
                used.add(name)
                return transform(tensors[name])
            keys = [k for k, _ in _per_layer(name, range(num_layers))]
            used.update(keys)
            arrays = [transform(tensors[k]) for k in keys]
            return np.stack(arrays) if weights.LAYER in name else arrays[0]
        return read

    for path, module in _peft_modules(model):
        module.load_peft_tensors(reader(path))
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    head_prefix = _method(method.kind).peft.head_prefix
    for spec in specs:
        key = head_prefix + spec.hf_name
        if freezing.is_head(spec.path) and key in tensors:
            used.add(key)
            surgery.assign(state[spec.path], spec.to_ftjax(tensors[key]), key)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{folder}: tensors ftjax did not use: {unused[:8]}")
    return plan
