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

import jax
import ml_collections
import numpy as np
from flax import nnx

from ftjax.models import registry, weights
from ftjax.peft import freezing, prompt, surgery
from ftjax.peft.config import method_config
from ftjax.peft.ia3 import IA3Linear
from ftjax.peft.lora import LoRALinear

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # tensors of tuner methods (LoRA, IA3): PeftModel -> LoraModel -> model
HEAD_PREFIX = {"prompt": "base_model.", "prefix": "base_model."}  # prompt learning has no tuner layer
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS",
              "token_classification": "TOKEN_CLS", "encoder": "FEATURE_EXTRACTION"}
EXPORTABLE = ("lora", "dora", "qlora", "ia3", "prompt", "prefix")


# ---------------------------------------------------------------------------------------------
# ftjax paths <-> HF module names
# ---------------------------------------------------------------------------------------------

def _head_specs(model: nnx.Module) -> tuple[str, list[weights.WeightSpec]]:
    """(head, weight map) of ``model``: the head whose own parameters are exactly the model's."""
    cfg = model.model.cfg
    family = registry.family_for_config(cfg)
    have = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if freezing.is_head(tuple(p)) and p[0] not in prompt.VIRTUAL}
    for head in family.hf_head_suffix:
        specs = family.hf_weight_map(cfg, head)
        if {s.path for s in specs if freezing.is_head(s.path)} == have:
            return head, specs
    raise ValueError(f"cannot tell the head of {type(model).__name__} for PEFT names")


def module_names(specs: list[weights.WeightSpec]) -> dict[tuple, str]:
    """ftjax Linear path -> HF module name (``{layer}`` in it when stacked)."""
    return {s.path[:-1]: s.hf_name[:-len(".weight")] for s in specs
            if s.path[-1] == "kernel" and s.hf_name.endswith(".weight")}


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

def _host(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x[...] if isinstance(x, nnx.Variable) else x), np.float32)


def export_peft(model: nnx.Module, method_cfg: ml_collections.ConfigDict, out_dir: str | Path,
                base_model_name_or_path: str | None = None) -> Path:
    """Write ``model``'s adapters as a PEFT folder that ``peft.PeftModel.from_pretrained`` loads."""
    from safetensors.numpy import save_file
    kind = method_cfg.kind
    if kind not in EXPORTABLE:
        raise ValueError(f"PEFT has no format for method {kind!r}; exportable: {EXPORTABLE}")
    head, specs = _head_specs(model)
    names = module_names(specs)
    cfg = model.model.cfg
    config: dict[str, Any] = dict(task_type=TASK_TYPES[head], inference_mode=True,
                                  base_model_name_or_path=base_model_name_or_path, revision=None)
    tensors: dict[str, np.ndarray] = {}
    if kind in ("lora", "dora", "qlora", "ia3"):
        cls = IA3Linear if kind == "ia3" else LoRALinear
        found = surgery.find(model, cls)
        for path, lin in found:
            name = names[path]
            if kind == "ia3":
                l = _host(lin.ia3_l)
                parts = {"ia3_l": l[..., None, :] if lin.feedforward else l[..., :, None]}
            else:
                parts = {"lora_A.weight": np.swapaxes(_host(lin.lora_a), -1, -2),
                         "lora_B.weight": np.swapaxes(_host(lin.lora_b), -1, -2)}
                if lin.magnitude is not None:
                    parts["lora_magnitude_vector"] = _host(lin.magnitude)
            for suffix, value in parts.items():
                tensors.update((f"{PREFIX}{n}.{suffix}", v) for n, v in _per_layer(name, value))
        targets = _exact_regex([names[p] for p, _ in found])
        if kind == "ia3":
            ff = [names[p] for p, lin in found if lin.feedforward]
            config.update(peft_type="IA3", target_modules=targets, fan_in_fan_out=False,
                          feedforward_modules=_exact_regex(ff) if ff else [],
                          init_ia3_weights=True)
        else:
            lin = found[0][1]
            rslora = bool(method_cfg.lora.rslora)
            config.update(peft_type="LORA", r=lin.rank, lora_alpha=float(method_cfg.lora.alpha),
                          use_rslora=rslora, use_dora=kind == "dora", target_modules=targets,
                          lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                          init_lora_weights=True)
    else:
        n = model.num_virtual_tokens
        common = dict(num_virtual_tokens=n, num_transformer_submodules=1,
                      num_layers=freezing.num_layers(model))
        if kind == "prompt":
            tensors["prompt_embeddings"] = _host(model.prompt_embeddings)
            config.update(peft_type="PROMPT_TUNING", token_dim=tensors["prompt_embeddings"].shape[1],
                          num_attention_heads=_attention(model).num_heads,
                          prompt_tuning_init="RANDOM", **common)
        else:
            attn = _attention(model)
            heads = getattr(attn, "num_kv_heads", attn.num_heads)
            tensors["prompt_embeddings"] = _host(model.prefix_values())
            config.update(peft_type="PREFIX_TUNING", token_dim=heads * attn.head_dim,
                          num_attention_heads=heads, encoder_hidden_size=cfg.hidden_size,
                          prefix_projection=False, **common)
    saved = []
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    if _trains_head(model, method_cfg):
        for spec in specs:
            if freezing.is_head(spec.path):
                tensors[HEAD_PREFIX.get(kind, PREFIX) + spec.hf_name] = spec.to_hf(_host(state[spec.path]))
                saved.append(spec.hf_name.rsplit(".", 1)[0])
    config["modules_to_save"] = sorted(set(saved)) or None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / WEIGHTS_FILE))
    return out


def _attention(model: nnx.Module) -> nnx.Module:
    found = prompt.attention_modules(model)
    if len(found) != 1:
        raise ValueError(f"expected one stack of attention modules, found {len(found)}")
    return found[0][1]


def _trains_head(model: nnx.Module, method_cfg: ml_collections.ConfigDict) -> bool:
    from ftjax.peft import train_head
    return train_head(model, method_cfg)


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
    return "^(" + "|".join(re.escape(surgery.path_str(p)) for p in paths) + ")$"


def method_from_peft(config: dict, model: nnx.Module) -> ml_collections.ConfigDict:
    """The ``config.method`` equivalent of a PEFT ``adapter_config.json`` for ``model``."""
    m = method_config()
    kind = config["peft_type"]
    names = module_names(_head_specs(model)[1])
    select = lambda rule: _selected(names, rule, freezing.num_layers(model))
    m.train_head = "true" if config.get("modules_to_save") else "false"
    if kind == "LORA":
        m.kind = "dora" if config.get("use_dora") else "lora"
        m.lora.rank, m.lora.alpha = int(config["r"]), float(config["lora_alpha"])
        m.lora.rslora = bool(config.get("use_rslora"))
        m.lora.targets = _path_regex(select(config["target_modules"]))
    elif kind == "IA3":
        m.kind = "ia3"
        m.ia3.targets = _path_regex(select(config["target_modules"]))
        ff = select(config.get("feedforward_modules"))
        m.ia3.feedforward = _path_regex(ff) if ff else "^$"
    elif kind == "PROMPT_TUNING":
        m.kind = "prompt"
        m.prompt.num_virtual_tokens = int(config["num_virtual_tokens"])
    elif kind == "PREFIX_TUNING":
        m.kind = "prefix"
        m.prefix.num_virtual_tokens = int(config["num_virtual_tokens"])
    else:
        raise ValueError(f"PEFT type {kind!r} is not supported (LORA, IA3, PROMPT_TUNING, PREFIX_TUNING)")
    return m


def _assign(var: nnx.Variable, value: np.ndarray, what: str) -> None:
    old = var.get_value()
    if tuple(value.shape) != tuple(old.shape):
        raise ValueError(f"{what}: PEFT tensor has shape {value.shape}, ftjax expects {old.shape}")
    var.set_value(jax.device_put(value.astype(old.dtype), old.sharding))


def import_peft(model: nnx.Module, adapter_dir: str | Path, tokenizer: Any = None):
    """Apply the PEFT adapter in ``adapter_dir`` to ``model``; returns the ``MethodPlan``."""
    from safetensors.numpy import load_file
    from ftjax.peft import apply_method
    folder = Path(adapter_dir)
    config = json.loads((folder / CONFIG_FILE).read_text())
    tensors = {k.replace(".default.", "."): v for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    head, specs = _head_specs(model)
    names = module_names(specs)
    method = method_from_peft(config, model)
    plan = apply_method(model, method, tokenizer)
    used: set[str] = set()
    num_layers = freezing.num_layers(model)

    def read(name: str, suffix: str, transform) -> np.ndarray:
        keys = [f"{PREFIX}{n}.{suffix}" for n, _ in _per_layer(name, range(num_layers))]
        used.update(keys)
        arrays = [transform(tensors[k]) for k in keys]
        return np.stack(arrays) if weights.LAYER in name else arrays[0]

    if method.kind in ("lora", "dora"):
        for path, lin in surgery.find(model, LoRALinear):
            _assign(lin.lora_a, read(names[path], "lora_A.weight", np.transpose), names[path])
            _assign(lin.lora_b, read(names[path], "lora_B.weight", np.transpose), names[path])
            if lin.magnitude is not None:
                _assign(lin.magnitude, read(names[path], "lora_magnitude_vector", np.asarray), names[path])
    elif method.kind == "ia3":
        for path, lin in surgery.find(model, IA3Linear):
            _assign(lin.ia3_l, read(names[path], "ia3_l", np.ravel), names[path])
    elif method.kind == "prompt":
        used.add("prompt_embeddings")
        _assign(model.prompt_embeddings, tensors["prompt_embeddings"], "prompt_embeddings")
    else:
        used.add("prompt_embeddings")
        _assign(model.prefix_embedding, tensors["prompt_embeddings"], "prompt_embeddings")
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for spec in specs:
        key = HEAD_PREFIX.get(method.kind, PREFIX) + spec.hf_name
        if freezing.is_head(spec.path) and key in tensors:
            used.add(key)
            _assign(state[spec.path], spec.to_ftjax(tensors[key]), key)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{folder}: tensors ftjax did not use: {unused[:8]}")
    return plan
