"""How a family's parameters correspond to Hugging Face tensor names.

Each family exposes ``hf_weight_map(cfg, head) -> list[WeightSpec]``. Loading, exporting and
GGUF conversion all read the same table, so a name is written down once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

LAYER = "{layer}"  # placeholder in ``hf_name`` for tensors stacked over the ``layers`` axis


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
