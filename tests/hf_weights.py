"""Test helpers: move weights between a torch ``state_dict`` and an ftjax model via WeightSpecs.

Both directions go through a family's ``hf_weight_map``, so a parity test checks the map too:
every ftjax parameter must be covered and every HF tensor used (tied copies excepted).
"""

from __future__ import annotations

from typing import Iterable

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from ftjax.models.weights import WeightSpec


def _params(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_torch_weights(model: nnx.Module, specs: list[WeightSpec],
                       state_dict: dict[str, torch.Tensor], tied: Iterable[str] = ()) -> None:
    """Fill ``model``'s parameters from ``state_dict`` (names with ``{layer}`` are stacked)."""
    params = _params(model)
    assert {s.path for s in specs} == set(params), set(params) ^ {s.path for s in specs}
    sd = {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
    used = set(tied)
    for spec in specs:
        var = params[spec.path]
        if spec.stacked:
            names = [spec.hf_name.format(layer=i) for i in range(var.shape[0])]
            value = np.stack([spec.to_ftjax(sd[n]) for n in names])
        else:
            names = [spec.hf_name]
            value = spec.to_ftjax(sd[spec.hf_name])
        used.update(names)
        assert value.shape == var.shape, (spec.path, value.shape, var.shape)
        var.set_value(jnp.asarray(value, var.dtype))  # nnx.state shares the model's Variables
    assert used == set(sd), f"unused HF tensors: {sorted(set(sd) - used)}"


def export_torch_weights(model: nnx.Module, specs: list[WeightSpec]) -> dict[str, torch.Tensor]:
    """The HF ``state_dict`` (without tied copies) of ``model``'s parameters."""
    params = _params(model)
    out = {}
    for spec in specs:
        value = np.asarray(params[spec.path].get_value())
        if spec.stacked:
            for i, layer in enumerate(value):
                out[spec.hf_name.format(layer=i)] = torch.from_numpy(np.array(spec.to_hf(layer)))
        else:
            out[spec.hf_name] = torch.from_numpy(np.array(spec.to_hf(value)))
    return out
