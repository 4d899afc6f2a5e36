"""How a family's parameters correspond to Hugging Face tensor names.

Each family exposes ``hf_weight_map(cfg, head) -> list[WeightSpec]``. Loading, exporting and
GGUF conversion all read the same table, so a name is written down once; ``iter_hf_tensors``
walks a model's parameters in that naming (export and GGUF both write from it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import numpy as np
from flax import nnx

from ftjax.models import registry

LAYER = "{layer}"  # placeholder in ``hf_name`` for tensors stacked over the ``layers`` axis
SAFETENSORS_INDEX = "model.safetensors.index.json"


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One ftjax parameter <-> one HF tensor (per layer when ``hf_name`` contains ``{layer}``)."""
    path: tuple[str, ...]  # path in the model's nnx state, e.g. ('model', 'norm', 'scale')
    hf_name: str  # e.g. 'model.layers.{layer}.self_attn.q_proj.weight'
    to_ftjax: Callable[[np.ndarray], np.ndarray] = identity
    to_hf: Callable[[np.ndarray], np.ndarray] = identity

    @property
    def stacked(self) -> bool:
        return LAYER in self.hf_name


def linear(path: tuple[str, ...], hf_prefix: str, bias: bool) -> list[WeightSpec]:
    """A torch ``nn.Linear`` (weight ``[out, in]``) <-> an ftjax ``Linear`` (kernel ``[in, out]``)."""
    specs = [WeightSpec(path + ("kernel",), hf_prefix + ".weight", transpose, transpose)]
    if bias:
        specs.append(WeightSpec(path + ("bias",), hf_prefix + ".bias"))
    return specs


def layer_norm(path: tuple[str, ...], hf_prefix: str) -> list[WeightSpec]:
    """A torch ``nn.LayerNorm`` (weight, bias) <-> an ftjax ``LayerNorm`` (scale, bias)."""
    return [WeightSpec(path + ("scale",), hf_prefix + ".weight"),
            WeightSpec(path + ("bias",), hf_prefix + ".bias")]


def expand(spec: WeightSpec, num_layers: int) -> list[str]:
    """The HF tensor names behind one spec (one per layer when stacked)."""
    if not spec.stacked:
        return [spec.hf_name]
    return [spec.hf_name.replace(LAYER, str(i)) for i in range(num_layers)]


def iter_hf_tensors(model: nnx.Module, head: str) -> Iterator[tuple[str, WeightSpec, Any, int | None]]:
    """Yield ``(hf_name, spec, device array, layer or None)`` in weight-map order (lazy: no copy)."""
    cfg = model.model.cfg
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for spec in registry.family_for_config(cfg).hf_weight_map(cfg, head):
        value = state[spec.path].get_value()
        if spec.stacked:
            for i, name in enumerate(expand(spec, value.shape[0])):
                yield name, spec, value, i
        else:
            yield spec.hf_name, spec, value, None


def to_host(spec: WeightSpec, value: jax.Array, layer: int | None,
            dtype: str | None = None) -> np.ndarray:
    """One HF tensor on the host, in HF layout and ``dtype`` (default: the parameter's own)."""
    x = np.asarray(jax.device_get(value if layer is None else value[layer]))
    return np.ascontiguousarray(spec.to_hf(x).astype(dtype or x.dtype, copy=False))
