"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024) on a Linear.

``y = x W + b + s (x A) B`` with ``A [in, r]`` uniform(+-1/sqrt(in)) (PEFT's kaiming default),
``B [r, out] = 0`` so a fresh adapter changes nothing, and ``s = alpha / r`` (rsLoRA:
``alpha / sqrt(r)``). DoRA learns a per-output-column magnitude ``m`` (initialised to the column
norms of ``W``) and rescales the adapted weight to it: ``y = (m / ||W + s A B||) (x W + s x A B) + b``,
the norm treated as a constant in the backward pass, as in the paper and PEFT. Other
initialisations (Gaussian, PiSSA, OLoRA: ``lora.init``) are in ``lora_init``; LoRA+ (``B`` at
``lora.plus_ratio x`` the learning rate) in ``loraplus``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ftjax.models import layers, registry as families
from ftjax.peft import freezing, lora_init, loraplus, registry, surgery
from ftjax.peft.linear import WrappedLinear
from ftjax.peft.plan import Context, MethodConfigError, MethodPlan, adapter_plan



def targets(model: nnx.Module, pattern: str) -> str:
    """``config.method.<method>.targets``, or when empty the family's LoRA default."""
    return pattern or families.family_of(model).lora_targets


# Every family's LoRA default in one regex, for methods whose config default is a fixed pattern
# (an empty pattern with :func:`targets` picks the one family's default instead).
TARGETS = "|".join(sorted({f"(?:{f.lora_targets})" for f in families.FAMILIES.values()}))


def column_norm(w: jax.Array) -> jax.Array:
    """L2 norm of each output column of a kernel ``[..., in, out]`` -> ``[..., out]``."""
    return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=-2))


class LoRAScale(nnx.Variable):
    """The LoRA scale ``s`` (one per stacked layer): frozen state rather than a Python constant,
    so sweep arms that differ only in ``alpha`` run the same compiled step."""


class LoRALinear(WrappedLinear):
    """A Linear with a low-rank update (optionally DoRA); stacked like the kernel it adapts."""

    mergeable = True

    def __init__(self, base: layers.Linear, *, rank: int, alpha: float, rslora: bool = False,
                 dora: bool = False, init: str = "true", dropout: float = 0.0, key: jax.Array):
        super().__init__(base)
        if rank < 1:
            raise MethodConfigError(f"config.method.lora.rank={rank} must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise MethodConfigError(f"config.method.lora.dropout={dropout} must be in [0, 1)")
        kernel = base.kernel
        lead_shape, lead_axes = surgery.lead(kernel, 2)
        in_axis, out_axis = surgery.axes_of(kernel)[-2:]
        self.rank = rank
        scale = alpha / (math.sqrt(rank) if rslora else rank)
        self.scaling = surgery.new_param(kernel, surgery.constant(scale), lead_shape, lead_axes,
                                         key, dtype=jnp.float32, cls=LoRAScale)
        self.lora_a = surgery.new_param(kernel, lora_init.a_init(init, self.in_features, rank),
                                        lead_shape + (self.in_features, rank),
                                        lead_axes + (in_axis, "lora_rank"), key)
        self.lora_b = surgery.new_param(kernel, surgery.constant(0.0),
                                        lead_shape + (rank, self.out_features),
                                        lead_axes + ("lora_rank", out_axis), key)
        self.magnitude = nnx.data(None)
        if dora:
            norm = surgery.compute_like(kernel, column_norm, kernel.get_value(),
                                        axes=lead_axes + (out_axis,))
            self.magnitude = surgery.AdapterParam(norm.astype(surgery.float_dtype(kernel)),
                                       logical_axes=lead_axes + (out_axis,))
        self.merge_scale = nnx.data(None)  # DoRA: the column scale used by merge(), kept for unmerge()
        # PEFT's lora_dropout on the branch's input: one key per stacked layer, train step only;
        # the rate is state (not graph), so arms that differ in it fuse
        self.lora_dropout = layers.Dropout(dropout, stack=lead_shape, traced=True) if dropout else None
        # PiSSA/OLoRA: the base kernel becomes W - s A0 B0; (A0, B0) are kept for the PEFT export
        self.lora_a0, self.lora_b0 = lora_init.initialise(self, init, scale, key)

    def delta(self) -> jax.Array:
        """``s A B`` ``[..., in, out]`` (stacked axes included)."""
        a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        return self.scaling[...][..., None, None] * jnp.einsum("...ir,...ro->...io", a, b)

    def dora_scale(self, w: jax.Array) -> jax.Array:
        """``m / ||W + s A B||`` per output column, the norm detached from the gradient."""
        norm = jax.lax.stop_gradient(column_norm(w.astype(jnp.float32) + self.delta()))
        return self.magnitude[...].astype(jnp.float32) / norm

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.merged:
            return super().__call__(x)
        x = x.astype(self.dtype)
        dropped = x if self.lora_dropout is None else self.lora_dropout(x)  # x itself in eval
        w = self.weight()
        a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
        y = jnp.einsum("...i,io->...o", x, w)
        s = self.scaling[...].astype(self.dtype)  # a scalar here: blocks run one layer at a time
        update = s * jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", dropped, a), b)
        if self.magnitude is None:
            return self.add_bias(y + update)
        scale = self.dora_scale(w).astype(self.dtype)
        if dropped is x:
            return self.add_bias(scale * (y + update))
        # PEFT's DoRA under dropout: the base output keeps x, the magnitude's correction sees the
        # dropped input: x W + (scale - 1) x' W + scale s x' A B
        dropped_y = jnp.einsum("...i,io->...o", dropped, w)
        return self.add_bias(y + (scale - 1) * dropped_y + scale * update)

    def merged_weights(self) -> tuple[jax.Array, jax.Array | None]:
        w, bias = super().merged_weights()
        merged = w.astype(jnp.float32) + self.delta()
        if self.magnitude is not None:
            scale = self.dora_scale(w)
            self.merge_scale = nnx.Variable(scale)
            merged = merged * scale[..., None, :]
        return merged, bias

    def unmerged_weights(self) -> tuple[jax.Array, jax.Array | None]:
        w = self.kernel[...].astype(jnp.float32)
        if self.magnitude is not None:
            w = w / self.merge_scale[...][..., None, :]
            self.merge_scale = None
        return w - self.delta(), None if self.bias is None else self.bias[...]

    def peft_tensors(self) -> dict[str, np.ndarray]:
        """PEFT's ``lora_A.weight [r, in]``, ``lora_B.weight [out, r]`` (and DoRA's magnitude)."""
        a, b = lora_init.exported_ab(self)  # after PiSSA/OLoRA: a rank-2r LoRA on the original base
        out = {"lora_A.weight": np.swapaxes(a, -1, -2), "lora_B.weight": np.swapaxes(b, -1, -2)}
        if self.magnitude is not None:
            out["lora_magnitude_vector"] = surgery.host(self.magnitude)
        return out

    def load_peft_tensors(self, read: Callable[[str, Callable], np.ndarray]) -> None:
        surgery.assign(self.lora_a, read("lora_A.weight", np.transpose))
        surgery.assign(self.lora_b, read("lora_B.weight", np.transpose))
        if self.magnitude is not None:
            surgery.assign(self.magnitude, read("lora_magnitude_vector", np.asarray))


def _apply(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    lo = m.lora
    init = lora_init.check(lo.init, m.kind)
    adapted = set(surgery.wrap_linears(
        model, layers.Linear, targets(model, lo.targets),
        lambda p, lin: LoRALinear(lin, rank=lo.rank, alpha=lo.alpha, rslora=lo.rslora,
                                  dora=m.kind == "dora", init=init, dropout=float(lo.dropout),
                                  key=next(ctx.keys)), m.kind))
    if m.kind == "qlora":  # every stacked kernel is stored quantised, adapted or not
        for path, lin in surgery.find(model, (layers.Linear, WrappedLinear)):
            if not freezing.is_stacked(lin.kernel):
                continue
            if path not in adapted:
                lin = WrappedLinear(lin)
                surgery.replace(model, path, lin)
            lin.quantize(m.qlora.quant, m.qlora.block_size)
    return loraplus.with_ratio(adapter_plan(model, ctx), float(lo.plus_ratio))


def _peft_config(model: nnx.Module, m: ml_collections.ConfigDict, found: list,
                 regex: Callable[[list], str]) -> dict[str, Any]:
    rank, alpha = lora_init.exported_rank_alpha(found[0][1], float(m.lora.alpha), bool(m.lora.rslora))
    return dict(r=rank, lora_alpha=alpha, use_rslora=bool(m.lora.rslora),
                use_dora=m.kind == "dora", target_modules=regex([p for p, _ in found]),
                lora_dropout=float(m.lora.dropout), bias="none", fan_in_fan_out=False,
                init_lora_weights=lora_init.peft_name(m.lora.init))


def _from_peft(config: dict, select: Callable[[Any], str]) -> dict[str, Any]:
    return dict(kind="dora" if config.get("use_dora") else "lora",
                lora=dict(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                          rslora=bool(config.get("use_rslora")),
                          dropout=float(config.get("lora_dropout") or 0.0),
                          init=lora_init.from_peft(config.get("init_lora_weights", True)),
                          targets=select(config["target_modules"])))


PEFT = registry.PeftFormat("LORA", _peft_config, _from_peft)
registry.register(registry.Method(
    "lora", _apply, mergeable=True, peft=PEFT,
    # dora/qlora too; targets: a regex over module paths, "" = the family's default
    defaults={"lora": dict(rank=8, alpha=16.0, targets="", rslora=False,
                           init="true",  # PEFT's init_lora_weights: true|gaussian|pissa[_niter_N]|olora
                           plus_ratio=0.0,  # LoRA+: B's lr = plus_ratio x lr; 0 = off
                           dropout=0.0)}))  # PEFT's lora_dropout, on the LoRA input, training only
registry.register(registry.Method("dora", _apply, mergeable=True, peft=PEFT))
registry.register(registry.Method(
    "qlora", _apply, mergeable=True, peft=PEFT,
    defaults={"qlora": dict(quant="nf4", block_size=64)}))  # nf4 | int8; blocks along the input axis
