"""VeRA (Kopiczko et al. 2024): one frozen random low-rank pair shared by every adapted layer,
and two trained scaling vectors per layer.

``y = x W + b + lambda_b * ((lambda_d * (x A^T)) B^T)`` with the shared ``A [r, max_in]`` and
``B [max_out, r]`` (kaiming-uniform, sliced to each layer's ``in``/``out`` as PEFT does),
``lambda_d [r]`` = ``d_initial`` and ``lambda_b [out]`` = 0, so a fresh adapter changes nothing.
The shared pair is drawn from ``jax.random.key(projection_prng_key)`` -- PEFT draws it with
torch's generator, so the same key gives different (equally distributed) numbers; exports always
carry the pair (PEFT's ``save_projection=True``) and imports need it. Blocks run under ``scan``,
so every adapted layer keeps its own (frozen, per-layer stacked) copy of the pair.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ftjax.models import layers
from ftjax.peft import registry, surgery
from ftjax.peft.delta import DeltaLinear
from ftjax.peft.lora import TARGETS
from ftjax.peft.plan import Context, MethodPlan, adapter_plan

SHARED = ("base_model.vera_A", "base_model.vera_B")  # PEFT's names for the shared pair


class VeraProjection(nnx.Variable):
    """The frozen shared random matrices (not a ``Param``: never trained, never in the optimizer)."""


def projection(key: jax.Array, rank: int, max_in: int, max_out: int) -> tuple[jax.Array, jax.Array]:
    """``A [r, max_in]``, ``B [max_out, r]`` drawn like PEFT's ``_kaiming_init`` (gain sqrt(2))."""
    ka, kb = jax.random.split(key)
    bound = lambda fan_in: math.sqrt(6.0 / fan_in)
    a = jax.random.uniform(ka, (rank, max_in), jnp.float32, -bound(max_in), bound(max_in))
    b = jax.random.uniform(kb, (max_out, rank), jnp.float32, -bound(rank), bound(rank))
    return a, b


class VeRALinear(DeltaLinear):
    """A Linear with a VeRA update; stacked like the kernel it adapts."""

    def __init__(self, base: layers.Linear, *, shared: tuple[jax.Array, jax.Array],
                 d_initial: float, key: jax.Array):
        super().__init__(base)
        kernel = base.kernel
        lead_shape, lead_axes = surgery.lead(kernel, 2)
        out_axis = surgery.axes_of(kernel)[-1]
        a, b = shared
        self.rank = a.shape[0]
        copy = lambda x: (lambda k, shape, dtype: jnp.broadcast_to(x, shape).astype(jnp.float32))
        self.vera_A = surgery.new_param(kernel, copy(a), lead_shape + a.shape,
                                        lead_axes + (None, None), key, cls=VeraProjection)
        self.vera_B = surgery.new_param(kernel, copy(b), lead_shape + b.shape,
                                        lead_axes + (None, None), key, cls=VeraProjection)
        self.vera_lambda_b = surgery.new_param(kernel, surgery.constant(0.0),
                                               lead_shape + (self.out_features,),
                                               lead_axes + (out_axis,), key)
        self.vera_lambda_d = surgery.new_param(kernel, surgery.constant(d_initial),
                                               lead_shape + (self.rank,),
                                               lead_axes + ("lora_rank",), key)

    def _factors(self) -> tuple[jax.Array, jax.Array]:
        """``(lambda_d * A[:, :in])^T [..., in, r]`` and ``(lambda_b * B[:out])^T [..., r, out]``."""
        d = self.vera_lambda_d[...].astype(jnp.float32)[..., None]
        b = self.vera_lambda_b[...].astype(jnp.float32)[..., None]
        a, b = self.vera_A[...][..., :self.in_features] * d, self.vera_B[...][..., :self.out_features, :] * b
        return jnp.swapaxes(a, -1, -2), jnp.swapaxes(b, -1, -2)

    def delta(self) -> jax.Array:
        a, b = self._factors()
        return jnp.einsum("...ir,...ro->...io", a, b)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.merged:
            return super().__call__(x)
        x = x.astype(self.dtype)
        a, b = (f.astype(self.dtype) for f in self._factors())
        y = jnp.einsum("...i,io->...o", x, self.weight())
        return self.add_bias(y + jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", x, a), b))

    def peft_tensors(self) -> dict[str, np.ndarray]:
        """The two vectors, per layer; the shared pair under PEFT's model-level names (one copy)."""
        lead = (0,) * (self.vera_A.get_value().ndim - 2)
        return {"vera_lambda_b": surgery.host(self.vera_lambda_b),
                "vera_lambda_d": surgery.host(self.vera_lambda_d),
                SHARED[0]: surgery.host(self.vera_A[...][lead]),
                SHARED[1]: surgery.host(self.vera_B[...][lead])}

    def load_peft_tensors(self, read: Callable[[str, Callable], np.ndarray]) -> None:
        surgery.assign(self.vera_lambda_b, read("vera_lambda_b", np.asarray), "vera_lambda_b")
        surgery.assign(self.vera_lambda_d, read("vera_lambda_d", np.asarray), "vera_lambda_d")
        for var, name in zip((self.vera_A, self.vera_B), SHARED):
            value = read(name, np.asarray)
            surgery.assign(var, np.broadcast_to(value, var.get_value().shape), name)


def _apply(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    v = m.vera
    if v.rank < 1:
        raise ValueError(f"config.method.vera.rank={v.rank} must be >= 1")
    found = surgery.find(model, layers.Linear, v.targets)
    max_in = max((lin.in_features for _, lin in found), default=1)
    max_out = max((lin.out_features for _, lin in found), default=1)
    shared = projection(jax.random.key(v.projection_prng_key), v.rank, max_in, max_out)
    surgery.wrap_linears(model, layers.Linear, v.targets, lambda p, lin: VeRALinear(
        lin, shared=shared, d_initial=v.d_initial, key=next(ctx.keys)), "vera")
    return adapter_plan(model, ctx)


def _peft_config(model: nnx.Module, m: ml_collections.ConfigDict, found: list,
                 regex: Callable[[list], str]) -> dict[str, Any]:
    return dict(r=found[0][1].rank, target_modules=regex([p for p, _ in found]),
                projection_prng_key=int(m.vera.projection_prng_key), save_projection=True,
                d_initial=float(m.vera.d_initial), vera_dropout=0.0, bias="none",
                fan_in_fan_out=False, init_weights=True)


def _from_peft(config: dict, select: Callable[[Any], str]) -> dict[str, Any]:
    if not config.get("save_projection", True):
        raise ValueError("PEFT VeRA adapter saved without its shared projection "
                         "(save_projection=false): ftjax cannot redraw torch's random matrices; "
                         "save it from PEFT with VeraConfig(save_projection=True)")
    return dict(kind="vera", vera=dict(rank=int(config["r"]), targets=select(config["target_modules"]),
                                       projection_prng_key=int(config.get("projection_prng_key", 0)),
                                       d_initial=float(config.get("d_initial", 0.1))))


registry.register(registry.Method(
    "vera", _apply, mergeable=True, peft=registry.PeftFormat("VERA", _peft_config, _from_peft),
    defaults={"vera": dict(rank=256, targets=TARGETS, projection_prng_key=0,  # PEFT's defaults
                           d_initial=0.1)}))
