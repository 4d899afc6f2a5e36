"""Device mesh, the logical-axis rules table, and shardings for parameters and batches.

Every parameter carries logical axis names (``logical_axes`` metadata on its ``nnx.Variable``).
One table, ``LOGICAL_RULES``, maps a logical name to mesh axes. A dimension that the mapped mesh
axes do not divide is replicated instead (tiny test models on a big mesh), so a rule is a
preference, never a crash.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ftjax.errors import FtjaxError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Fused sweep arms (ftjax.train.fused) add this axis in front of the three: it shards the leading
# ``arm`` dimension of the stacked trainable params, optimizer state and per-arm batches.
ARM_AXIS = "arm"

# logical name -> mesh axes (a tuple shards one dimension over several mesh axes).
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    # A fused run's arm dimension goes on its own mesh axis, never on data/fsdp/tensor: frozen
    # weights carry no 'arm' and so are replicated over it (one copy per arm group of devices,
    # sharded over fsdp/tensor inside the group as usual) and batch rows split over data x fsdp
    # within each arm group.
    ("arm", (ARM_AXIS,)),
    ("layers", None),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),  # flattened num_heads * head_dim of q / o projections
    ("kv", ("tensor",)),  # flattened num_kv_heads * head_dim of k / v projections
    ("mlp", ("tensor",)),
    ("norm", None),
    ("position", None),
    ("token_type", None),  # BERT/RoBERTa token-type (segment) embedding rows
    ("labels", None),
    ("lora_rank", None),
    ("act_seq", None),
    ("act_embed", None),
)


class MeshError(FtjaxError, ValueError):
    """A mesh that cannot be built on the available devices."""


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Turn ``{'data': 1, 'fsdp': -1, 'tensor': 2}`` into concrete sizes for ``num_devices``."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"config.mesh has unknown axes {sorted(unknown)}; valid axes are {MESH_AXES}")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise MeshError("config.mesh: at most one axis may be -1 (= the remaining devices)")
    if any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"config.mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
    fixed = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % fixed:
            raise MeshError(
                f"config.mesh: fixed axes multiply to {fixed}, which does not divide the "
                f"{num_devices} devices; change config.mesh so the product divides {num_devices}")
        shape[free[0]] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise MeshError(
            f"config.mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but "
            f"{num_devices} are available; set one axis to -1 or make the product {num_devices}")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[Any] | None = None, *,
              arms: int = 1) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types over ``devices`` (default: all).

    ``arms`` > 1 (a fused run) puts an ``arm`` axis of that size in front; ``sizes`` then
    describe each arm group's ``len(devices) / arms`` devices.
    """
    devices = list(devices) if devices is not None else jax.devices()
    if arms > 1 and len(devices) % arms:
        raise MeshError(f"{arms} arm shards do not divide the {len(devices)} devices")
    shape = resolve_mesh_shape(sizes, len(devices) // arms)
    names = MESH_AXES
    if arms > 1:
        shape, names = (arms, *shape), (ARM_AXIS, *MESH_AXES)
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int],
                    mesh: Mesh, rules=LOGICAL_RULES) -> P:
    """PartitionSpec for an array of ``shape`` whose dims have ``logical_axes``."""
    if not logical_axes:
        return P()
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in the sharding table")
        axes = tuple(a for a in (table.get(name) or ()) if a not in used and mesh.shape.get(a, 1) > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings for every leaf of an ``nnx.State`` (replicated when unannotated)."""

    def one(v):
        if _is_variable(v):
            value = v.get_value()
            axes = v.get_metadata().get("logical_axes")
            return v.replace(NamedSharding(mesh, logical_to_spec(axes, np.shape(value), mesh, rules)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=_is_variable)


def batch_spec(ndim: int) -> P:
    """Batches split their leading dimension over data x fsdp."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim))


def batch_divisor(mesh: Mesh) -> int:
    """How many ways the global batch is split."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def constrain(x: jax.Array, *logical_axes: str | None) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    table = dict(LOGICAL_RULES)
    spec = []
    for name, dim in zip(logical_axes, x.shape):
        axes = tuple(a for a in (table.get(name) or ()) if mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        spec.append(None if not axes or dim % size else axes)
    return jax.lax.with_sharding_constraint(x, P(*spec))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays split over data x fsdp."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in batch.items()}
