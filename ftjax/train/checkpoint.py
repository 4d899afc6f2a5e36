"""Orbax checkpoints: train state + data-iterator position, async, keep-N latest plus the best.

A checkpoint holds ``state`` (trainable params, optimizer state, step, RNG) and ``data`` (the
input iterator's JSON position). Frozen weights are not saved: they are reloaded from the model
source, which is what makes adapter checkpoints small.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from ftjax.paths import as_path

_policies = ocp.checkpoint_managers


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with the ftjax retention rules."""

    def __init__(self, directory: str | os.PathLike, cfg: ml_collections.ConfigDict, *,
                 best_metric: str = "loss", best_mode: str = "min"):
        if best_mode not in ("min", "max"):
            raise ValueError(f"config.eval.best_mode={best_mode!r}; choose 'min' or 'max'")
        self.best_metric = best_metric
        keep: list[Any] = [_policies.LatestN(n=int(cfg.keep))]
        if cfg.keep_best:
            keep.append(_policies.BestN(get_metric_fn=self._metric, reverse=best_mode == "min",
                                        n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_policies.AnyPreservationPolicy(keep),
            best_fn=self._metric, best_mode=best_mode,
            enable_async_checkpointing=bool(cfg.async_save), create=True)
        self.manager = ocp.CheckpointManager(as_path(directory), options=options)

    def _metric(self, metrics: dict) -> float:
        if self.best_metric not in metrics:
            raise KeyError(f"eval metrics have no {self.best_metric!r} (config.eval.best_metric); "
                           f"available: {sorted(metrics)}")
        return float(metrics[self.best_metric])

    def save(self, step: int, state: Any, data_state: dict, metrics: dict | None = None,
             force: bool = False) -> bool:
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state)),
            metrics=metrics, force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def resolve(self, which: str) -> int:
        """'latest', 'best' or a step number -> an existing step (clear error otherwise)."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {self.manager.directory}")
        if which == "latest":
            return max(steps)
        if which == "best":
            best = self.best_step()
            if best is None:
                raise FileNotFoundError(f"no checkpoint with eval metrics in {self.manager.directory}; "
                                        "use --checkpoint=latest")
            return best
        step = int(which)
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint at step {step} in {self.manager.directory}; have {steps}")
        return step

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore onto the shardings given by ``abstract_state`` (ShapeDtypeStructs)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out.state, out.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live pytree, as a restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
