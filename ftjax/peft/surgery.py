"""Model surgery: find sub-modules by path regex, swap them, and create adapter parameters.

Blocks are stored stacked (a leading ``layers`` axis on every block parameter), so an adapter that
lives inside a block is stacked too: it takes the leading axes of the kernel it adapts. New
parameters are created straight into the sharding their logical axes give on the mesh of the
weight they adapt, so a LoRA ``A`` ``(layers, embed, lora_rank)`` is split like its kernel's input.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from ftjax import sharding

Init = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


class AdapterParam(nnx.Param):
    """A parameter a fine-tuning method added (LoRA ``A``/``B``, IA3 vectors, virtual tokens...):
    what an adapter method trains is the ``AdapterParam`` type filter (plus the head if asked)."""


def path_str(path: Sequence[Any]) -> str:
    """``('model', 'layers', 'self_attn', 'q_proj')`` -> ``'model/layers/self_attn/q_proj'``."""
    return "/".join(map(str, path))


def find(model: nnx.Module, cls: type | tuple[type, ...], pattern: str = "") -> list[tuple[tuple, Any]]:
    """``(path, module)`` of every ``cls`` instance whose path matches ``pattern`` (``re.search``)."""
    rx = re.compile(pattern)
    return [(tuple(p), m) for p, m in nnx.iter_graph(model)
            if isinstance(m, cls) and rx.search(path_str(p))]


def wrap_linears(model: nnx.Module, base: type, pattern: str, make: Callable[[tuple, Any], Any],
                 what: str) -> list[tuple]:
    """Replace every ``base`` module whose path matches ``pattern`` by ``make(path, module)``;
    returns the paths. No match is an error listing the candidates."""
    found = find(model, base, pattern)
    if not found:
        names = [path_str(p) for p, _ in find(model, base)]
        raise ValueError(f"{what}: no linear layer matches {pattern!r}; linear layers: {names}")
    for path, lin in found:
        replace(model, path, make(path, lin))
    return [p for p, _ in found]


def as_adapter(module: nnx.Module) -> nnx.Module:
    """Turn every ``nnx.Param`` inside ``module`` (e.g. a freshly built MLP) into an ``AdapterParam``."""
    for _, sub in list(nnx.iter_graph(module)):
        if isinstance(sub, nnx.Module):
            for name, var in list(vars(sub).items()):
                if type(var) is nnx.Param:
                    setattr(sub, name, AdapterParam(var.get_value(), **var.get_metadata()))
    return module


def replace(model: nnx.Module, path: Sequence[Any], new: Any) -> None:
    """Put ``new`` at ``path`` inside ``model`` (in place)."""
    parent = model
    for key in path[:-1]:
        parent = getattr(parent, key)
    setattr(parent, path[-1], new)


def axes_of(var: nnx.Variable) -> tuple[str | None, ...]:
    return tuple(var.get_metadata().get("logical_axes") or (None,) * var.get_value().ndim)


def lead(var: nnx.Variable, trailing: int) -> tuple[tuple[int, ...], tuple[str | None, ...]]:
    """Shape and logical axes of ``var``'s leading (stacked) dims, before its last ``trailing``."""
    shape, axes = var.get_value().shape, axes_of(var)
    n = len(shape) - trailing
    return tuple(shape[:n]), axes[:n]


def sharding_like(like: nnx.Variable, shape: Sequence[int], axes: Sequence[str | None]
                  ) -> NamedSharding | None:
    """The sharding ``axes`` give on the mesh ``like`` lives on (None off a mesh)."""
    current = getattr(like.get_value(), "sharding", None)
    if not isinstance(current, NamedSharding):
        return None
    return NamedSharding(current.mesh, sharding.logical_to_spec(axes, shape, current.mesh))


def compute_like(like: nnx.Variable, fn: Callable[..., Any], *args: Any,
                 axes: Any) -> Any:
    """``jit(fn)(*args)`` with outputs laid out per ``axes`` (one tuple per output, or one tuple)."""
    out = jax.eval_shape(fn, *args)
    if isinstance(out, tuple):
        target = tuple(sharding_like(like, o.shape, a) for o, a in zip(out, axes))
    else:
        target = sharding_like(like, out.shape, axes)
    return jax.jit(fn, out_shardings=target)(*args)


def place_like(like: nnx.Variable, module: nnx.Module) -> None:
    """Move every variable of ``module`` onto ``like``'s mesh, laid out by its logical axes."""
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable):
            value = var.get_value()
            target = sharding_like(like, value.shape, axes_of(var))
            if target is not None:
                var.set_value(jax.device_put(value, target))


def new_param(like: nnx.Variable, init: Init, shape: Sequence[int], axes: Sequence[str | None],
              key: jax.Array, dtype: Any = None, cls: type = AdapterParam) -> nnx.Variable:
    """A fresh parameter ``init(key, shape, dtype)`` born in the sharding of ``axes`` next to ``like``."""
    shape, axes = tuple(shape), tuple(axes)
    value = init(key, shape, dtype or float_dtype(like))
    target = sharding_like(like, shape, axes)
    return cls(value if target is None else jax.device_put(value, target), logical_axes=axes)


def host(x: Any) -> np.ndarray:
    """A parameter (or array) gathered to the host as float32."""
    return np.asarray(jax.device_get(x[...] if isinstance(x, nnx.Variable) else x), np.float32)


def assign(var: nnx.Variable, value: np.ndarray, what: str = "") -> None:
    """Set ``var`` from a host array of its exact shape, keeping its dtype and sharding."""
    old = var.get_value()
    if tuple(value.shape) != tuple(old.shape):
        raise ValueError(f"{what or 'parameter'}: tensor has shape {value.shape}, ftjax expects "
                         f"{old.shape}")
    var.set_value(jax.device_put(value.astype(old.dtype), old.sharding))


def float_dtype(var: nnx.Variable) -> Any:
    """``var``'s dtype when floating, else float32 (adapters on quantised kernels)."""
    dtype = var.get_value().dtype
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def uniform(bound: float) -> Init:
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def normal(std: float) -> Init:
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def constant(value: float) -> Init:
    return lambda key, shape, dtype: jnp.full(shape, value, dtype)


def keys(seed: int) -> Iterator[jax.Array]:
    """An endless stream of independent keys."""
    base, i = jax.random.key(seed), 0
    while True:
        yield jax.random.fold_in(base, i)
        i += 1
