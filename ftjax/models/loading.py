"""Load a model from a Hugging Face folder, a hub id, a ``.gguf`` file or a preset onto a mesh.

Weights are read one tensor at a time and placed straight into their mesh shardings (dtype
converted on the way); a stacked parameter is assembled layer by layer. The host therefore holds
at most one (stacked) parameter besides the model's own shards — never a second full copy.
Every family's ``hf_weight_map`` is the single table of names used here, in export and in GGUF.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from ftjax import sharding
from ftjax.errors import FtjaxError, require
from ftjax.models import registry, weights
from ftjax.models.weights import SAFETENSORS_INDEX, expand

log = logging.getLogger(__name__)

PICKLE_INDEX = "pytorch_model.bin.index.json"
# Files a hub download fetches: weights as safetensors, configs, tokenizer files. Never code.
HUB_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*",
                "*.model", "*.tiktoken", "vocab.txt", "merges.txt")
# Non-parameter buffers some checkpoints carry; skipped without complaint.
IGNORED_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|\.attn\.masked_bias|\.attn\.bias"
                             r"|embeddings\.position_ids)$")
SENTENCE_POOLING_FILE = "1_Pooling/config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")


class CheckpointError(FtjaxError, ValueError):
    """A checkpoint that does not fit the model; the message names the offending tensors."""


class ModelConfigError(FtjaxError, ValueError):
    """A model setting (``config.model``, a ``from_pretrained`` keyword) the model cannot take."""


class TensorSource(Protocol):
    """Named tensors in Hugging Face naming, read one at a time."""

    def names(self) -> Iterable[str]: ...

    def get(self, name: str) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------
# Tensor sources
# ---------------------------------------------------------------------------------------------

class SafetensorsSource:
    """A single ``model.safetensors`` or shards listed by ``model.safetensors.index.json``."""

    def __init__(self, folder: Path):
        from safetensors import safe_open
        self._open = partial(safe_open, framework="numpy")
        index = folder / SAFETENSORS_INDEX
        if index.exists():
            self._file_of = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            self._file_of = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(path, framework="numpy") as f:
                    self._file_of.update(dict.fromkeys(f.keys(), path))
        self._handles: dict[Path, Any] = {}

    def names(self) -> Iterable[str]:
        return self._file_of.keys()

    def get(self, name: str) -> np.ndarray:
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = self._open(path)
        return self._handles[path].get_tensor(name)


class PickleSource:
    """Pickled PyTorch ``.bin`` shards, loaded with ``torch.load(weights_only=True, mmap=True)``."""

    def __init__(self, folder: Path):
        torch = require("torch", "torch", "Loading pickled PyTorch .bin weights (allow_pickle=True)")
        index = folder / PICKLE_INDEX
        files = (sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
                 if index.exists() else sorted(folder.glob("*.bin")))
        self._tensors: dict[str, Any] = {}
        for path in files:
            self._tensors.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def get(self, name: str) -> np.ndarray:
        import torch
        t = self._tensors[name]
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def folder_source(folder: Path, allow_pickle: bool) -> TensorSource:
    """The weights in a Hugging Face folder; pickled ``.bin`` files only with ``allow_pickle``."""
    if any(folder.glob("*.safetensors")):
        return SafetensorsSource(folder)
    if any(folder.glob("*.bin")):
        if not allow_pickle:
            raise CheckpointError(
                f"{folder} holds only pickled PyTorch .bin weights, which can execute code when "
                "loaded; convert them to safetensors or pass allow_pickle=True if you trust them")
        return PickleSource(folder)
    raise CheckpointError(f"{folder} has no *.safetensors (or *.bin) weight files")


# ---------------------------------------------------------------------------------------------
# Placing tensors on the mesh
# ---------------------------------------------------------------------------------------------

def _place(x: np.ndarray, target: NamedSharding) -> jax.Array:
    return jax.make_array_from_callback(x.shape, target, lambda idx: x[idx])


def _read(source: TensorSource, spec: weights.WeightSpec, names: list[str],
          shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """One parameter on the host in its final dtype; stacked ones filled a layer at a time."""
    per_layer = shape[1:] if spec.stacked else shape
    out = np.empty(shape, dtype)
    for i, name in enumerate(names):
        x = spec.to_ftjax(source.get(name))
        if x.shape != per_layer:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(x.shape)} after conversion, "
                                  f"but the model expects {per_layer} for {'/'.join(spec.path)}")
        if spec.stacked:
            out[i] = x
        else:
            out[...] = x
    return out


# Base-model prefixes transformers adds or strips when a bare backbone checkpoint (e.g.
# all-MiniLM-L6-v2, saved as ``BertModel``) is loaded with a head, or the reverse.
BASE_PREFIXES = ("bert.", "roberta.", "model.", "transformer.")


class RenamedSource:
    """A view of a source under the names the model expects."""

    def __init__(self, source: TensorSource, expected_to_stored: dict[str, str]):
        self.source, self.mapping = source, expected_to_stored
        stored = set(expected_to_stored.values())
        self._names = [n for n in source.names() if n not in stored] + list(expected_to_stored)

    def names(self) -> Iterable[str]:
        return self._names

    def get(self, name: str) -> np.ndarray:
        return self.source.get(self.mapping.get(name, name))


def align_prefix(source: TensorSource, expected: Iterable[str]) -> TensorSource:
    """Apply transformers' base-model prefix rule: add or strip ``bert.``/``model.``/... ."""
    available = set(source.names())
    mapping = {}
    for name in expected:
        if name in available:
            continue
        for prefix in BASE_PREFIXES:
            if name.startswith(prefix) and name[len(prefix):] in available:
                mapping[name] = name[len(prefix):]
            elif prefix + name in available:
                mapping[name] = prefix + name
    return RenamedSource(source, mapping) if mapping else source


def _is_head(spec: weights.WeightSpec) -> bool:
    return spec.path[0] != "model"


def _check_names(family: registry.Family, cfg: Any, head: str, specs: list[weights.WeightSpec],
                 num_layers: int, available: set[str], where: str) -> set[str]:
    """Raise on missing/unexpected tensors; return the head tensors to initialise fresh."""
    expected = {n: s for s in specs for n in expand(s, num_layers)}
    missing = sorted(set(expected) - available)
    fresh = {n for n in missing if head != "causal_lm" and _is_head(expected[n])}
    if set(missing) - fresh:
        raise CheckpointError(f"{where} is missing tensor(s) {sorted(set(missing) - fresh)}")
    other_heads = {n for h in family.hf_head_suffix if h != head
                   for s in family.hf_weight_map(cfg, h) if _is_head(s) for n in expand(s, num_layers)}
    if getattr(cfg, "tie_embeddings", False):
        other_heads.add("lm_head.weight")  # some tied checkpoints still store the copy
    unexpected = sorted(n for n in available - set(expected)
                        if not IGNORED_BUFFERS.search(n) and n not in other_heads)
    if unexpected:
        raise CheckpointError(f"{where} has unexpected tensor(s) {unexpected}")
    dropped = sorted((available & other_heads) - set(expected))
    if dropped:
        log.warning("ignoring tensors of another head: %s", dropped)
    if fresh:
        log.warning("newly initialised (not in the checkpoint): %s", sorted(fresh))
    return fresh


def load_weights(family: registry.Family, cfg: Any, head: str, num_labels: int,
                 source: TensorSource, mesh: Mesh, *, seed: int = 0, where: str = "checkpoint"
                 ) -> nnx.Module:
    """Build ``family``'s model for ``cfg``/``head`` on ``mesh`` with its weights from ``source``."""
    build: Callable[[nnx.Rngs], nnx.Module] = lambda rngs: family.build(cfg, head, num_labels, rngs)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(seed))))
    flat = dict(nnx.to_flat_state(abstract))
    targets = dict(nnx.to_flat_state(sharding.state_shardings(abstract, mesh)))
    specs = family.hf_weight_map(cfg, head)
    num_layers = next((flat[s.path].get_value().shape[0] for s in specs if s.stacked), 0)
    source = align_prefix(source, [n for s in specs for n in expand(s, num_layers)])
    fresh = _check_names(family, cfg, head, specs, num_layers, set(source.names()), where)

    for spec in specs:
        names = expand(spec, num_layers)
        if fresh.issuperset(names):
            continue
        var, target = flat[spec.path], targets.pop(spec.path).get_value()
        value = var.get_value()
        host = _read(source, spec, names, tuple(value.shape), value.dtype)
        flat[spec.path] = var.replace(_place(host, target))
        del host

    unmapped = sorted("/".join(map(str, p)) for p, v in flat.items()
                      if p in targets and isinstance(v, nnx.Param)
                      and not any(s.path == p for s in specs))
    if unmapped:
        raise CheckpointError(f"parameters with no checkpoint mapping: {unmapped}")
    rest = [p for p in flat if p in targets]  # fresh heads and non-parameter state
    if rest:
        out = [targets[p] for p in rest]

        @partial(jax.jit, out_shardings=out)
        def init():
            state = dict(nnx.to_flat_state(nnx.split(build(nnx.Rngs(seed)))[1]))
            return [state[p] for p in rest]

        flat.update(zip(rest, init()))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ---------------------------------------------------------------------------------------------
# from_pretrained
# ---------------------------------------------------------------------------------------------

def _default_mesh() -> Mesh:
    return sharding.make_mesh({"fsdp": -1})


def checkpoint_head(family: registry.Family, d: dict) -> str:
    """The head a checkpoint was saved with, from its ``architectures`` (as transformers' Auto
    classes read it); without one, a causal LM or (encoder families) the bare encoder."""
    for arch in d.get("architectures") or ():
        head = family.head_for_architecture(arch)
        if head is not None:
            return head
    return "causal_lm" if family.causal else "encoder"


def replace_config(family: registry.Family, cfg: Any, **fields: Any) -> Any:
    """``dataclasses.replace(cfg, **fields)``, refusing a field the family's config does not have."""
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cfg)})
    if unknown:
        hint = (" (only BERT-family classifiers pool; the others classify their last token)"
                if "pooling" in unknown else "")
        raise ModelConfigError(f"{family.name} models have no setting {', '.join(map(repr, unknown))}{hint}")
    return dataclasses.replace(cfg, **fields)


def model_config(d: dict, head: str | None, num_labels: int, dtype: str, param_dtype: str,
            overrides: dict) -> tuple[registry.Family, Any, str, int]:
    family = registry.family_for_model_type(d.get("model_type", "<missing>"))
    head = head or checkpoint_head(family, d)
    cfg = family.from_hf_config(d)
    cfg = replace_config(family, cfg, dtype=dtype, param_dtype=param_dtype, **overrides)
    if head not in ("causal_lm", "encoder", "masked_lm") and not num_labels:
        num_labels = len(d.get("id2label") or {})
        if not num_labels:
            raise ValueError(f"head {head!r} needs num_labels (the checkpoint does not say)")
    return family, cfg, head, num_labels


def folder_config(path: Path) -> dict:
    """A HF folder's config.json, with a sentence-transformers checkpoint's pooling added."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json")
    d = json.loads(config_file.read_text())
    if (path / SENTENCE_POOLING_FILE).exists():
        d["sentence_transformers_pooling"] = json.loads((path / SENTENCE_POOLING_FILE).read_text())
    return d


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer (never running remote code), or None when it has none."""
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def _download(repo_id: str, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download
    patterns = list(HUB_PATTERNS) + (["*.bin", "*.bin.index.json"] if allow_pickle else [])
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def from_pretrained(source: str | Path, *, head: str | None = None, num_labels: int = 0,
                    dtype: str = "float32", param_dtype: str = "float32", mesh: Mesh | None = None,
                    allow_pickle: bool = False, seed: int = 0, **overrides: Any
                    ) -> tuple[nnx.Module, Any]:
    """Load ``(model, tokenizer)`` from a HF folder, hub id, ``.gguf`` file or preset name.

    ``head=None`` takes the checkpoint's own architecture (``BertForMaskedLM`` -> ``masked_lm``,
    ``*ForSequenceClassification`` with its labels, a bare ``BertModel`` -> ``encoder``); a preset
    or a file without ``architectures`` gets a causal LM, or the encoder for an encoder family.

    ``overrides`` replace config fields (e.g. ``scan_layers=False``, ``remat="full"``). Head
    parameters a checkpoint lacks (a classifier on top of a causal LM) are initialised from
    ``seed``; every other mismatch raises ``CheckpointError`` naming the tensors.
    """
    mesh = mesh or _default_mesh()
    path = Path(source)
    if path.suffix == ".gguf":
        from ftjax.models import gguf_io
        d, tensors = gguf_io.read_gguf(path)
        family, cfg, head, num_labels = model_config(d, head, num_labels, dtype, param_dtype, overrides)
        model = load_weights(family, cfg, head, num_labels, tensors, mesh, seed=seed,
                             where=str(path))
        return model, gguf_io.load_tokenizer(path)
    if not path.is_dir():
        if str(source) in registry.PRESETS:
            family, cfg = registry.get_preset(str(source))
            cfg = replace_config(family, cfg, dtype=dtype, param_dtype=param_dtype, **overrides)
            head = head or checkpoint_head(family, {})
            return registry.init_sharded(
                lambda rngs: family.build(cfg, head, num_labels, rngs), mesh, seed), None
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
            raise ValueError(f"{source!r} is not a folder, a .gguf file, a preset "
                             f"({sorted(registry.PRESETS)}) or a hub id (owner/name)")
        path = _download(str(source), allow_pickle)
    d = folder_config(path)
    family, cfg, head, num_labels = model_config(d, head, num_labels, dtype, param_dtype, overrides)
    tensors = folder_source(path, allow_pickle)
    model = load_weights(family, cfg, head, num_labels, tensors, mesh, seed=seed, where=str(path))
    return model, load_tokenizer(path)
