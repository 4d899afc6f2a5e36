"""Export a model as a Hugging Face folder that ``transformers`` loads without warnings.

config.json (with ``architectures``), safetensors shards split at ``max_shard_size`` with an
index, generation_config.json and the tokenizer files. Tensors are gathered to the host one
(per-layer) tensor at a time; at most one shard is held on the host while it is written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from ftjax.models import registry
from ftjax.models.registry import head_of
from ftjax.models.weights import SAFETENSORS_INDEX, iter_hf_tensors, to_host

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes, transformers' default
__all__ = ["head_of", "iter_hf_tensors", "model_config", "save_pretrained", "to_host"]


def model_config(model: nnx.Module) -> Any:
    """The architecture config of a headed model (its backbone's ``cfg``)."""
    return model.model.cfg


def _hf_config(model: nnx.Module, head: str, dtype: str,
               id2label: dict[int, str] | None) -> dict:
    cfg = model_config(model)
    family = registry.family_for_config(cfg)
    d = family.to_hf_config(cfg)
    d["architectures"] = [family.hf_architecture(cfg, head)]
    d["dtype"] = dtype
    if head != "causal_lm":
        specs = [s for s in family.hf_weight_map(cfg, head) if s.path[0] != "model"]
        state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        num_labels = state[specs[0].path].get_value().shape[-1]
        id2label = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
        d["id2label"] = {str(k): v for k, v in id2label.items()}
        d["label2id"] = {v: int(k) for k, v in id2label.items()}
    return d


def save_pretrained(model: nnx.Module, out_dir: str | Path, tokenizer: Any = None, *,
                    head: str | None = None, dtype: str | None = None,
                    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                    id2label: dict[int, str] | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``) as a transformers folder; returns ``out_dir``."""
    from safetensors.numpy import save_file

    head = head or head_of(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = list(iter_hf_tensors(model, head))
    itemsize = {name: np.dtype(dtype or v.dtype).itemsize for name, _, v, _ in tensors}
    shards: list[list[tuple]] = [[]]
    size = 0
    for t in tensors:
        shape = t[2].shape[1:] if t[3] is not None else t[2].shape
        nbytes = math.prod(shape) * itemsize[t[0]]
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes

    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = ("model.safetensors" if len(shards) == 1
                 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
        arrays = {name: to_host(spec, value, layer, dtype) for name, spec, value, layer in shard}
        save_file(arrays, str(out / fname), metadata={"format": "pt"})
        total += sum(a.nbytes for a in arrays.values())
        weight_map.update(dict.fromkeys(arrays, fname))
        del arrays
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))

    param_dtype = str(np.dtype(dtype or tensors[0][2].dtype))
    config = _hf_config(model, head, param_dtype, id2label)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if head == "causal_lm":
        gen = {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (out / "generation_config.json").write_text(
            json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
