"""``config.model.init_from``: start a run from the weights another run trained.

The previous run's latest checkpoint holds only its trainable parameters; the rest of its model
came from its model source or from its own ``init_from``. So the chain is followed first (oldest
run first) and each run's trained parameters are written over the freshly built model, matched
by parameter path, straight into the new model's shardings. A parameter the previous run trained
that the new model lacks (e.g. a LoRA adapter under full fine-tuning) is an error, not a silent drop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx


def _key(entry: Any) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))


def _path(keys: tuple) -> tuple[str, ...]:
    path = tuple(_key(k) for k in keys)
    return path[:-1] if path and path[-1] == "value" else path


def previous_init(workdir: Path) -> str:
    """The ``model.init_from`` a previous run itself started from ('' if none)."""
    config = json.loads((workdir / "config.json").read_text())
    return config.get("model", {}).get("init_from", "") or ""


def restore_trained(params: nnx.State, frozen: nnx.State, workdir: str | Path
                    ) -> tuple[nnx.State, nnx.State]:
    """``(params, frozen)`` with the trained weights of ``workdir`` (and of its ``init_from`` chain)."""
    workdir = Path(workdir)
    if not (workdir / "config.json").exists():
        raise FileNotFoundError(f"config.model.init_from={str(workdir)!r} is not a run directory "
                                "(no config.json)")
    earlier = previous_init(workdir)
    if earlier:
        params, frozen = restore_trained(params, frozen, earlier)
    live = {tuple(str(k) for k in path): var for state in (params, frozen)
            for path, var in nnx.to_flat_state(state)}
    with ocp.CheckpointManager((workdir / "checkpoints").absolute(),
                               item_handlers={"state": ocp.PyTreeCheckpointHandler()}) as mgr:
        step = mgr.latest_step()
        if step is None:
            raise FileNotFoundError(f"config.model.init_from: no checkpoints in {workdir / 'checkpoints'}")
        saved = mgr.item_metadata(step)["state"]["params"]
        flat = jax.tree_util.tree_flatten_with_path(saved)[0]
        missing = [".".join(_path(k)) for k, _ in flat if _path(k) not in live]
        if missing:
            raise ValueError(f"config.model.init_from={str(workdir)!r} trained parameters this model "
                             f"does not have: {missing[:5]} (a different model or method?)")
        for keys, meta in flat:
            var = live[_path(keys)]
            if tuple(meta.shape) != tuple(var.get_value().shape):
                raise ValueError(f"config.model.init_from: {'.'.join(_path(keys))} has shape "
                                 f"{tuple(meta.shape)} in {workdir}, {tuple(var.get_value().shape)} here")
        target: dict = {}
        for keys, _ in flat:  # the saved tree as plain dicts, leaves shaped and sharded as here
            *parents, last = [_key(k) for k in keys]
            node = target
            for name in parents:
                node = node.setdefault(name, {})
            value = live[_path(keys)].get_value()
            node[last] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=value.sharding)
        target = {"params": target}
        restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=jax.tree.map(
                lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype), target),
            partial_restore=True)))
    values = {_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(restored.state["params"])[0]}

    def update(state: nnx.State) -> nnx.State:
        return nnx.from_flat_state([
            (path, var.replace(values[tuple(str(k) for k in path)])
             if tuple(str(k) for k in path) in values else var)
            for path, var in nnx.to_flat_state(state)])

    return update(params), update(frozen)
