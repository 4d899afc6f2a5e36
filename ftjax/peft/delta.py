"""The shared shape of additive weight-update methods (LoHa, LoKr, VeRA): ``y = x (W + dW) + b``.

A subclass says how to build ``dW`` ``[..., in, out]`` from its parameters (all stacked axes
included, so the same code serves a block's layer inside ``scan`` and a whole stack for merging);
the forward, merge and unmerge follow from it. Adapter parameters are kept under PEFT's tensor
names and in PEFT's orientation, so they export as they are.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.peft import surgery
from ftjax.peft.linear import WrappedLinear


def kaiming_bound(fan_in: int) -> float:
    """torch's ``kaiming_uniform_(a=sqrt(5))`` bound, PEFT's default init: ``1 / sqrt(fan_in)``."""
    return 1.0 / fan_in ** 0.5


class DeltaLinear(WrappedLinear):
    """A Linear plus a dense weight update ``delta()`` rebuilt from the adapter's factors."""

    mergeable = True

    def delta(self) -> jax.Array:
        """``dW`` ``[..., in, out]`` in float32."""
        raise NotImplementedError

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.merged:
            return super().__call__(x)
        x = x.astype(self.dtype)
        w = self.weight() + self.delta().astype(self.dtype)
        return self.add_bias(jnp.einsum("...i,io->...o", x, w))

    def merged_weights(self) -> tuple[jax.Array, jax.Array | None]:
        w, bias = super().merged_weights()
        return w.astype(jnp.float32) + self.delta(), bias

    def unmerged_weights(self) -> tuple[jax.Array, jax.Array | None]:
        return (self.kernel[...].astype(jnp.float32) - self.delta(),
                None if self.bias is None else self.bias[...])

    def peft_tensors(self) -> dict[str, np.ndarray]:
        """Every adapter parameter under its own (PEFT's) name, stacked axes kept."""
        return {name: surgery.host(var) for name, var in vars(self).items()
                if isinstance(var, surgery.AdapterParam)}

    def load_peft_tensors(self, read: Callable[[str, Callable], np.ndarray]) -> None:
        for name, var in vars(self).items():
            if isinstance(var, surgery.AdapterParam):
                surgery.assign(var, read(name, np.asarray), name)


# ---------------------------------------------------------------------------------------------
# PEFT's LyCORIS configs (LoHa, LoKr): r, alpha, per-layer patterns and dropouts
# ---------------------------------------------------------------------------------------------

def lycoris_peft_config(found: list, m_section: Any, regex: Callable[[list], str]) -> dict[str, Any]:
    """``adapter_config.json`` entries LoHa and LoKr share."""
    return dict(r=int(m_section.rank), alpha=float(m_section.alpha),
                target_modules=regex([p for p, _ in found]), rank_pattern={}, alpha_pattern={},
                rank_dropout=0.0, module_dropout=0.0, init_weights=True,
                use_effective_conv2d=False)


def lycoris_from_peft(config: dict, select: Callable[[Any], str]) -> dict[str, Any]:
    """``config.method.<loha|lokr>`` fields of a PEFT LoHa/LoKr config; per-layer ranks refused."""
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"PEFT {config['peft_type']} adapter has a {key} ({config[key]}); "
                             "ftjax uses one rank and alpha for every adapted layer")
    return dict(rank=int(config["r"]), alpha=float(config["alpha"]),
                targets=select(config["target_modules"]))
