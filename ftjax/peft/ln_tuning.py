"""LN tuning (Zhao et al. 2023): train only the normalisation layers' scales (and biases).

PEFT trains a copy of each targeted norm; here the targeted norms train in place, which is the
same model (a fresh run starts unchanged, the trained one is a plain model: nothing to merge).
The targeted norms are swapped for :class:`TunedNorm` subclasses of their own class -- the same
parameters under the same paths, the same forward -- so the PEFT export can find them and name
their tensors ``<HF module>.ln_tuning_layers.weight`` (``.bias`` for LayerNorm), as PEFT does.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections
import numpy as np
from flax import nnx

from ftjax.models import layers
from ftjax.peft import freezing, registry, surgery
from ftjax.peft.plan import Context, MethodPlan

# PEFT's per-family norm targets (Llama/Mistral/Gemma/Gemma2, GPT-2), and every BERT LayerNorm
# (PEFT has no BERT default); Qwen3's per-head q_norm/k_norm are not included, as in PEFT.
TARGETS = (r"(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|"
           r"post_feedforward_layernorm|model/norm|ln_1|ln_2|ln_f|LayerNorm)$")
PEFT_NAMES = {"scale": "ln_tuning_layers.weight", "bias": "ln_tuning_layers.bias"}


class TunedNorm:
    """Mixin: a norm module taken over with its parameters, exported in PEFT's LN tuning names."""

    def __init__(self, norm: nnx.Module):
        for name, value in vars(norm).items():
            if not name.startswith("_"):
                setattr(self, name, value)

    def _params(self) -> dict[str, nnx.Variable]:
        return {n: getattr(self, n) for n in PEFT_NAMES if getattr(self, n, None) is not None}

    def peft_tensors(self) -> dict[str, np.ndarray]:
        return {PEFT_NAMES[n]: surgery.host(v) for n, v in self._params().items()}

    def load_peft_tensors(self, read: Callable[[str, Callable], np.ndarray]) -> None:
        for n, var in self._params().items():
            surgery.assign(var, read(PEFT_NAMES[n], np.asarray), PEFT_NAMES[n])


class TunedRMSNorm(TunedNorm, layers.RMSNorm):
    pass


class TunedLayerNorm(TunedNorm, layers.LayerNorm):
    pass


_TUNED = {layers.RMSNorm: TunedRMSNorm, layers.LayerNorm: TunedLayerNorm}


def _apply(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    pattern = m.ln_tuning.targets
    found = [(p, n) for p, n in surgery.find(model, tuple(_TUNED), pattern)
             if not isinstance(n, TunedNorm)]
    if not found:
        names = [surgery.path_str(p) for p, _ in surgery.find(model, tuple(_TUNED))]
        raise ValueError(f"ln_tuning: no norm layer matches config.method.ln_tuning.targets="
                         f"{pattern!r}; norm layers: {names}")
    for path, norm in found:
        surgery.replace(model, path, _TUNED[type(norm)](norm))
    tuned = {p for p, _ in found}
    head = ctx.train_head
    return MethodPlan(model, freezing.params_where(
        lambda p, v: p[:-1] in tuned or (head and freezing.is_head(p))))


def _peft_config(model: nnx.Module, m: ml_collections.ConfigDict, found: list,
                 regex: Callable[[list], str]) -> dict[str, Any]:
    return dict(target_modules=regex([p for p, _ in found]))


def _from_peft(config: dict, select: Callable[[Any], str]) -> dict[str, Any]:
    return dict(kind="ln_tuning", ln_tuning=dict(targets=select(config["target_modules"])))


registry.register(registry.Method(
    "ln_tuning", _apply, plain=True,
    peft=registry.PeftFormat("LN_TUNING", _peft_config, _from_peft),
    defaults={"ln_tuning": dict(targets=TARGETS)}))
