"""LoKr (Yeh et al. 2023, LyCORIS): a Kronecker-product update.

``dW = s kron(W1, W2)`` ``[out, in]`` with ``out = a b`` and ``in = c d`` split by PEFT's
``factorization`` (``decompose_factor``), ``W1 [a, c]``, ``W2 [b, d]`` and ``s = alpha / r``.
As in PEFT, ``W2`` is itself low rank (``W2a [b, r] W2b [r, d]``) when ``r < max(b, d) / 2``, and
``W1`` too (``W1a W1b``) with ``decompose_both`` when ``r < max(a, c) / 2``. PEFT's init: ``W1``
(or ``W1a``) zero, the rest kaiming-uniform, so a fresh adapter changes nothing. Tensors are kept
in PEFT's ``[out, in]`` orientation and names (``lokr_w1``, ``lokr_w2_a`` ...).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ftjax.models import layers
from ftjax.peft import registry, surgery
from ftjax.peft.delta import DeltaLinear, kaiming_bound, lycoris_from_peft, lycoris_peft_config
from ftjax.peft.lora import TARGETS, LoRAScale
from ftjax.peft.plan import Context, MethodPlan, adapter_plan


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS's) split of ``dimension`` into ``m <= n`` with ``m n = dimension``: ``m =
    factor`` when it divides, else the most balanced pair with ``m <= factor`` (-1: no bound)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    length = m + n  # fixed, as in PEFT: the loop runs until m >= n or m passes the factor
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrLinear(DeltaLinear):
    """A Linear with a LoKr update; stacked like the kernel it adapts."""

    def __init__(self, base: layers.Linear, *, rank: int, alpha: float, decompose_both: bool = False,
                 decompose_factor: int = -1, key: jax.Array):
        super().__init__(base)
        if rank < 1:
            raise ValueError(f"config.method.lokr.rank={rank} must be >= 1")
        kernel = base.kernel
        lead_shape, lead_axes = surgery.lead(kernel, 2)
        self.rank = rank
        (a, b), (c, d) = factorization(self.out_features, decompose_factor), \
            factorization(self.in_features, decompose_factor)
        self.scaling = surgery.new_param(kernel, surgery.constant(alpha / rank), lead_shape,
                                         lead_axes, key, dtype=jnp.float32, cls=LoRAScale)
        keys = iter(jax.random.split(key, 4))

        def new(shape, init):  # Kronecker factors do not line up with the kernel's mesh axes
            return surgery.new_param(kernel, init, lead_shape + shape, lead_axes + (None, None),
                                     next(keys))

        zero, kaiming = surgery.constant(0.0), lambda fan_in: surgery.uniform(kaiming_bound(fan_in))
        self.lokr_w1 = self.lokr_w1_a = self.lokr_w1_b = nnx.data(None)
        self.lokr_w2 = self.lokr_w2_a = self.lokr_w2_b = nnx.data(None)
        if decompose_both and rank < max(a, c) / 2:
            self.lokr_w1_a, self.lokr_w1_b = new((a, rank), zero), new((rank, c), kaiming(c))
        else:
            self.lokr_w1 = new((a, c), zero)
        if rank < max(b, d) / 2:
            self.lokr_w2_a, self.lokr_w2_b = new((b, rank), kaiming(rank)), new((rank, d), kaiming(d))
        else:
            self.lokr_w2 = new((b, d), kaiming(d))

    @staticmethod
    def _factor(full, lo, hi) -> jax.Array:
        if full is not None:
            return full[...].astype(jnp.float32)
        lo, hi = lo[...].astype(jnp.float32), hi[...].astype(jnp.float32)
        return jnp.einsum("...ir,...rj->...ij", lo, hi)

    def delta(self) -> jax.Array:
        w1 = self._factor(self.lokr_w1, self.lokr_w1_a, self.lokr_w1_b)
        w2 = self._factor(self.lokr_w2, self.lokr_w2_a, self.lokr_w2_b)
        (a, c), (b, d) = w1.shape[-2:], w2.shape[-2:]
        kron = jnp.einsum("...ac,...bd->...cdab", w1, w2)  # kron(w1, w2)[a b, c d], transposed
        kron = kron.reshape(kron.shape[:-4] + (c * d, a * b))
        return self.scaling[...][..., None, None] * kron


def _apply(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    lo = m.lokr
    surgery.wrap_linears(model, layers.Linear, lo.targets, lambda p, lin: LoKrLinear(
        lin, rank=lo.rank, alpha=lo.alpha, decompose_both=lo.decompose_both,
        decompose_factor=lo.decompose_factor, key=next(ctx.keys)), "lokr")
    return adapter_plan(model, ctx)


def _peft_config(model: nnx.Module, m: ml_collections.ConfigDict, found: list,
                 regex: Callable[[list], str]) -> dict[str, Any]:
    return dict(lycoris_peft_config(found, m.lokr, regex), decompose_both=bool(m.lokr.decompose_both),
                decompose_factor=int(m.lokr.decompose_factor), rank_dropout_scale=False)


def _from_peft(config: dict, select: Callable[[Any], str]) -> dict[str, Any]:
    return dict(kind="lokr", lokr=dict(lycoris_from_peft(config, select),
                                       decompose_both=bool(config.get("decompose_both")),
                                       decompose_factor=int(config.get("decompose_factor", -1))))


registry.register(registry.Method(
    "lokr", _apply, mergeable=True, peft=registry.PeftFormat("LOKR", _peft_config, _from_peft),
    defaults={"lokr": dict(rank=8, alpha=8.0, targets=TARGETS,  # PEFT's defaults
                           decompose_both=False, decompose_factor=-1)}))
