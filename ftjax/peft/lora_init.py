"""LoRA initialisations, PEFT's ``init_lora_weights`` (``config.method.lora.init``).

- ``true`` (PEFT's ``True``, the default): ``A`` kaiming-uniform (``+-1/sqrt(in)``), ``B = 0``.
- ``gaussian``: ``A ~ N(0, (1/r)^2)``, ``B = 0``.
- ``pissa`` (Meng et al. 2024): ``A``, ``B`` from the top-``r`` singular triplets of the base
  weight ``W = V S U^T`` (PEFT's orientation ``[out, in]``): ``B = V_r sqrt(S_r / s)``,
  ``A = sqrt(S_r / s) U_r^T``; ``pissa_niter_N`` takes them from a randomised SVD with ``N``
  subspace iterations (Halko et al. 2009, Algorithm 5.1, as ``torch.svd_lowrank``).
- ``olora`` (Büyükakyüz 2024): ``W = Q R``, ``B = Q[:, :r]``, ``A = R[:r]``.

PiSSA and OLoRA take ``s B A`` out of the base kernel (``W_res = W - s B A``), so the model starts
exactly where it was, as PEFT's ``pissa_init`` / ``olora_init`` do (in float32, the residual cast
back to the kernel's dtype). The initial ``A0``, ``B0`` stay beside the adapter as frozen
:class:`LoRAInit` variables: the PEFT export writes what training changed on the *original* base,
``s (B A - B0 A0) = s [B | -B0] [A ; A0]``, as a plain rank-``2r`` LoRA with ``lora_alpha``
doubled (``* sqrt 2`` for rsLoRA) so the scale ``s`` is unchanged, which is what PEFT's
``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes. Merged (plain HF)
exports fold ``s B A`` into ``W_res`` and need nothing of this.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.peft import surgery
from ftjax.peft.plan import MethodConfigError

INITS = ("true", "gaussian", "pissa", "pissa_niter_N", "olora")
_NITER = re.compile(r"pissa_niter_(\d+)")


class LoRAInit(nnx.Variable):
    """The initial ``A`` or ``B`` of an init that moved part of the base weight into the adapter
    (PiSSA, OLoRA): frozen, rebuilt with the model, used by the PEFT export."""


def check(init: str, kind: str) -> str:
    """``init`` if it names an initialisation usable with method ``kind``; else a one-line error."""
    if init not in ("true", "gaussian", "pissa", "olora") and not _NITER.fullmatch(init):
        raise MethodConfigError(f"config.method.lora.init={init!r}; choose from {INITS}")
    if kind == "qlora" and moves_base(init):
        raise MethodConfigError(f"config.method.lora.init={init!r} changes the base weight, which qlora "
                         "stores quantised; use kind='lora' or 'dora', or init='true'|'gaussian'")
    return init


def moves_base(init: str) -> bool:
    """Whether ``init`` subtracts the initial adapter from the base kernel (PiSSA, OLoRA)."""
    return init == "olora" or init.startswith("pissa")


def a_init(init: str, in_features: int, rank: int) -> surgery.Init:
    """The draw of ``A`` before any base-dependent init (PEFT's ``reset_lora_parameters``)."""
    if init == "gaussian":
        return surgery.normal(1 / rank)
    return surgery.uniform(1 / math.sqrt(in_features))  # kaiming_uniform(a=sqrt(5))


def _svd_lowrank(w: jax.Array, q: int, niter: int, key: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``torch.svd_lowrank(w, q, niter)``: ``(U [.., m, q], S [.., q], V [.., n, q])``."""
    t = lambda x: jnp.swapaxes(x, -1, -2)
    tall = w.shape[-2] >= w.shape[-1]
    a = w if tall else t(w)
    r = jax.random.normal(key, a.shape[:-2] + (a.shape[-1], q), jnp.float32)
    basis = jnp.linalg.qr(a @ r)[0]
    for _ in range(niter):
        basis = jnp.linalg.qr(t(a) @ basis)[0]
        basis = jnp.linalg.qr(a @ basis)[0]
    u, s, vh = jnp.linalg.svd(t(basis) @ a, full_matrices=False)
    u, v = basis @ u, t(vh)
    return (u, s, v) if tall else (v, s, u)


def _decompose(kernel: jax.Array, init: str, rank: int, scale: float, key: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(W_res, A, B)`` in ftjax's layout (``[.., in, out]``, ``[.., in, r]``, ``[.., r, out]``)."""
    w = jnp.swapaxes(kernel.astype(jnp.float32), -1, -2)  # PEFT's [out, in]
    if init == "olora":
        q, r = jnp.linalg.qr(w)
        a_p, b_p = r[..., :rank, :], q[..., :, :rank]
    else:
        niter = _NITER.fullmatch(init)
        if niter:
            v, s, u = _svd_lowrank(w, rank, int(niter.group(1)), key)
            uh = jnp.swapaxes(u, -1, -2)
        else:
            v, s, uh = jnp.linalg.svd(w, full_matrices=False)
            v, s, uh = v[..., :rank], s[..., :rank], uh[..., :rank, :]
        root = jnp.sqrt(s / scale)
        a_p, b_p = root[..., :, None] * uh, v * root[..., None, :]
    residual = w - scale * (b_p @ a_p)
    return (jnp.swapaxes(residual, -1, -2).astype(kernel.dtype), jnp.swapaxes(a_p, -1, -2),
            jnp.swapaxes(b_p, -1, -2))


def initialise(lin: Any, init: str, scale: float, key: jax.Array) -> tuple[Any, Any]:
    """Apply a base-dependent init to a fresh ``LoRALinear`` in place; returns its frozen
    ``(A0, B0)`` (:class:`LoRAInit`) for PiSSA/OLoRA, else ``(None, None)``."""
    if not moves_base(init):
        return nnx.data(None), nnx.data(None)
    if lin.quantized:
        raise MethodConfigError(f"config.method.lora.init={init!r} needs a float base kernel")
    limit = min(lin.in_features, lin.out_features)
    if lin.rank > limit:
        raise MethodConfigError(f"config.method.lora.rank={lin.rank} exceeds min(in, out)={limit} of a "
                         f"{lin.in_features}x{lin.out_features} layer; {init} needs rank <= {limit}")
    kernel = lin.kernel
    fn = lambda k, key: _decompose(k, init, lin.rank, scale, key)
    residual, a, b = surgery.compute_like(
        kernel, fn, kernel.get_value(), jax.random.fold_in(key, 1),
        axes=(surgery.axes_of(kernel), surgery.axes_of(lin.lora_a), surgery.axes_of(lin.lora_b)))
    kernel.set_value(residual)
    initial = []
    for var, value in ((lin.lora_a, a), (lin.lora_b, b)):
        value = value.astype(var.get_value().dtype)
        var.set_value(value)
        # a copy: the trainable A, B are donated to the train step, the frozen A0, B0 are not
        initial.append(LoRAInit(jnp.copy(value), logical_axes=surgery.axes_of(var)))
    return initial[0], initial[1]


def exported_ab(lin: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` on the host as PEFT's base sees them: ``([A | A0], [B ; -B0])`` after PiSSA /
    OLoRA, so the adapter applies to the original base weight."""
    a, b = surgery.host(lin.lora_a), surgery.host(lin.lora_b)
    if lin.lora_a0 is None:
        return a, b
    return (np.concatenate([a, surgery.host(lin.lora_a0)], axis=-1),
            np.concatenate([b, -surgery.host(lin.lora_b0)], axis=-2))


def exported_rank_alpha(lin: Any, alpha: float, rslora: bool) -> tuple[int, float]:
    """PEFT's ``r`` and ``lora_alpha`` for :func:`exported_ab`'s tensors (same scale ``s``)."""
    if lin.lora_a0 is None:
        return lin.rank, alpha
    return 2 * lin.rank, alpha * (math.sqrt(2) if rslora else 2)


def peft_name(init: str) -> Any:
    """``adapter_config.json``'s ``init_lora_weights`` of an exported adapter."""
    return "gaussian" if init == "gaussian" else True  # PiSSA/OLoRA export as plain LoRA


def from_peft(value: Any) -> str:
    """``config.method.lora.init`` for a PEFT ``init_lora_weights`` (an adapter being loaded:
    PEFT reruns a PiSSA/OLoRA init on the base it loads onto, and so does ftjax)."""
    if isinstance(value, bool):
        return "true"  # False (random A and B) only matters before the weights are loaded
    name = str(value).lower()
    if name in ("gaussian", "pissa", "olora") or _NITER.fullmatch(name):
        return name
    raise MethodConfigError(f"PEFT init_lora_weights={value!r} is not supported; ftjax has {INITS}")
