"""Many LoRA/DoRA adapters over one copy of a base model: a per-row adapter gather (S-LoRA, Punica).

Each targeted linear of the base becomes a :class:`MultiLoRALinear` that keeps the base layer
and the stacked weights of every adapter, zero-padded to the largest rank: ``A [..., N, in, r]``,
``B [..., N, r, out]``, scales ``[..., N]`` and DoRA column scales ``[..., N, out]`` (1 for plain
LoRA), where index 0 is the base model itself (all zeros). Inside a traced forward,
``with adapter_rows(ids):`` says which adapter each of the ``B`` rows uses; every row shares the
base matmul and gathers its own low-rank update: ``y = c_n (x W + s_n (x A_n) B_n) + b``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.errors import FtjaxError
from ftjax.peft.lora import LoRALinear

_ROWS: contextvars.ContextVar = contextvars.ContextVar("adapter_rows", default=None)


@contextlib.contextmanager
def adapter_rows(ids: jax.Array | None) -> Iterator[None]:
    """Route row ``i`` of every forward traced in this block through adapter ``ids[i]`` (0 = base)."""
    token = _ROWS.set(ids)
    try:
        yield
    finally:
        _ROWS.reset(token)


class AdapterError(FtjaxError, ValueError):
    """An adapter that cannot be served over the base model (its message names it and why)."""


class AdapterStack(nnx.Variable):
    """Frozen stacked adapter weights (not trainable parameters)."""


@dataclasses.dataclass
class LoRAWeights:
    """One adapter's update at one linear, stacked like its kernel: ``a [..., in, r]``,
    ``b [..., r, out]``, ``scaling [...]``, DoRA's column scale ``[..., out]`` (or None), and
    the base kernel it was trained over (to check it is the served one)."""
    a: np.ndarray
    b: np.ndarray
    scaling: np.ndarray
    column_scale: np.ndarray | None
    base_kernel: np.ndarray


class MultiLoRALinear(nnx.Module):
    """A base linear plus the stacked updates of ``N`` adapters, picked per row."""

    def __init__(self, base: nnx.Module, adapters: list[LoRAWeights | None]):
        """``adapters[i]`` is adapter ``i + 1``'s update here (None: that adapter leaves it alone)."""
        self.base = base
        kernel = np.asarray(base.kernel[...])
        lead, (d_in, d_out) = kernel.shape[:-2], kernel.shape[-2:]
        rank = max(w.a.shape[-1] for w in adapters if w is not None)
        n = len(adapters) + 1
        a = np.zeros(lead + (n, d_in, rank), np.float32)
        b = np.zeros(lead + (n, rank, d_out), np.float32)
        scaling = np.zeros(lead + (n,), np.float32)
        column = np.ones(lead + (n, d_out), np.float32)
        for i, w in enumerate(adapters, start=1):
            if w is None:
                continue
            r = w.a.shape[-1]
            a[..., i, :, :r], b[..., i, :r, :], scaling[..., i] = w.a, w.b, w.scaling
            if w.column_scale is not None:
                column[..., i, :] = w.column_scale
        self.dora = any(w is not None and w.column_scale is not None for w in adapters)
        self.lora_a, self.lora_b = AdapterStack(jnp.asarray(a)), AdapterStack(jnp.asarray(b))
        self.scaling, self.column_scale = AdapterStack(jnp.asarray(scaling)), AdapterStack(
            jnp.asarray(column))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        ids = _ROWS.get()
        if ids is None:
            return y
        dtype = y.dtype
        a = self.lora_a[...][ids].astype(dtype)  # [B, in, r]
        b = self.lora_b[...][ids].astype(dtype)  # [B, r, out]
        lead = (ids.shape[0],) + (1,) * (x.ndim - 2)
        s = self.scaling[...][ids].astype(dtype).reshape(lead + (1,))
        update = s * jnp.einsum("b...r,bro->b...o", jnp.einsum("b...i,bir->b...r",
                                                              x.astype(dtype), a), b)
        if not self.dora:
            return y + update
        bias = 0 if getattr(self.base, "bias", None) is None else self.base.bias[...].astype(dtype)
        column = self.column_scale[...][ids].astype(dtype).reshape(lead + (-1,))
        return column * (y - bias + update) + bias


def lora_weights(model: nnx.Module, what: str) -> dict[tuple, LoRAWeights]:
    """Every LoRA/DoRA update of ``model`` by module path (``what`` names it in errors)."""
    out = {}
    for path, lin in nnx.iter_graph(model):
        if not isinstance(lin, LoRALinear):
            continue
        if lin.merged or lin.quantized:
            raise AdapterError(f"adapter {what}: {'/'.join(map(str, path))} is "
                             f"{'merged' if lin.merged else 'quantised (QLoRA)'}; only unmerged "
                             "LoRA/DoRA over a float base can share the base model")
        column = None if lin.magnitude is None else np.asarray(lin.dora_scale(lin.weight()))
        out[tuple(path)] = LoRAWeights(np.asarray(lin.lora_a[...], np.float32),
                                       np.asarray(lin.lora_b[...], np.float32),
                                       np.asarray(lin.scaling[...], np.float32), column,
                                       np.asarray(lin.weight()))
    if not out:
        raise AdapterError(f"adapter {what} has no LoRA/DoRA layer (only LoRA-family adapters can "
                         "share the base model)")
    return out


def attach(model: nnx.Module, adapters: dict[str, dict[tuple, LoRAWeights]]) -> dict[str, int]:
    """Rewrite ``model``'s targeted linears to serve every adapter; returns name -> row index.

    Each adapter's base kernels must equal ``model``'s own (else it belongs to another base).
    """
    names = list(adapters)
    paths = sorted({p for a in adapters.values() for p in a}, key=str)
    for path in paths:
        lin = _get(model, path)
        mine = np.asarray(lin.kernel[...])
        for name in names:
            theirs = adapters[name].get(path)
            if theirs is not None and (theirs.base_kernel.shape != mine.shape or not np.allclose(
                    theirs.base_kernel, mine, rtol=0, atol=1e-6)):
                raise AdapterError(f"adapter {name}: its base weights at {'/'.join(map(str, path))} "
                                 "differ from the served --model's; serve it over the base model "
                                 "it was trained on")
        _set(model, path, MultiLoRALinear(lin, [adapters[n].get(path) for n in names]))
    return {name: i for i, name in enumerate(names, start=1)}


def _get(model: nnx.Module, path: tuple) -> nnx.Module:
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _set(model: nnx.Module, path: tuple, value: nnx.Module) -> None:
    parent = _get(model, path[:-1])
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)
