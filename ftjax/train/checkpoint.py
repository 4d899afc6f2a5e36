"""Orbax checkpoints: train state + data-iterator position, async, keep-N latest plus the best.

A checkpoint holds ``state`` (trainable params, optimizer state, step, RNG) and ``data`` (the
input iterator's JSON position). Frozen weights are not saved: they are reloaded from the model
source, which is what makes adapter checkpoints small.

Restores are checked: a checkpoint with a missing file or unreadable data is named in one line
(``RunCheckpointError``). On resume a damaged newest checkpoint is moved aside to
``damaged-<step>`` (nothing is deleted; orbax no longer sees it as a step) and the newest intact
one is restored instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from ftjax.errors import FtjaxError
from ftjax.paths import as_path

_policies = ocp.checkpoint_managers
# Files every checkpoint step has (StandardSave's OCDBT tree and JsonSave's file).
_REQUIRED = ("state/_METADATA", "state/manifest.ocdbt", "data/metadata")


class RunCheckpointError(FtjaxError, FileNotFoundError):
    """A training checkpoint that is missing, damaged or unreadable."""


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data: dict
    damaged: list[tuple[int, str, str]]  # (step, what is wrong, where it was moved)


def _drop_unfinished_reads() -> None:
    """After a failed restore orbax's other array reads are left unfinished: their tensorstore
    callbacks then find the event loop closed, and Python prints each leftover read's traceback
    (with tensorstore's spec) when it collects them, hundreds of lines after the one-line report
    of the first failure (some while it is still being raised), through the unraisable hook, the
    except hook or asyncio's "Task exception was never retrieved" log. Those (and only those) are
    dropped from the first restore on."""
    if getattr(sys.unraisablehook, "_ftjax", False):
        return
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def leftover(exc: BaseException | None, obj: Any = None) -> bool:
        return "_read_array_index_and_device_put" in getattr(obj, "__qualname__", "") or (
            isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed")

    def unraisable_hook(unraisable) -> None:
        if not leftover(unraisable.exc_value, unraisable.object):
            previous_unraisable(unraisable)

    def except_hook(kind, exc, tb) -> None:  # tensorstore's callback thread reports through it
        if not leftover(exc):
            previous_except(kind, exc, tb)

    class LeftoverTaskFilter(logging.Filter):  # asyncio logs "Task exception was never retrieved"
        def filter(self, record: logging.LogRecord) -> bool:
            exc = record.exc_info[1] if record.exc_info else None
            return not (leftover(exc) or "_read_array_index_and_device_put" in record.getMessage()
                        or "Encountered error while reading array index" in str(exc))

    unraisable_hook._ftjax = True
    sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
    logging.getLogger("asyncio").addFilter(LeftoverTaskFilter())


def _root_cause(e: BaseException) -> str:
    """The innermost error's first line, without tensorstore's spec dump."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = " ".join(str(e).split("[tensorstore_spec")[0].split(" See full TensorStore")[0].split())
    return f"{type(e).__name__}: {text[:300]}"


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
            raise RunCheckpointError(f"no checkpoints in {self.manager.directory}; train first "
                                     "(scripts/train.py) or pass the run's --workdir")
        if which == "latest":
            return max(steps)
        if which == "best":
            best = self.best_step()
            if best is None:
                raise RunCheckpointError(f"no checkpoint with eval metrics in {self.manager.directory}; "
                                         "use --checkpoint=latest")
            return best
        if not which.isdigit():
            raise RunCheckpointError(f"--checkpoint={which!r}: use latest, best or a step number")
        step = int(which)
        if step not in steps:
            raise RunCheckpointError(f"no checkpoint at step {step} in {self.manager.directory}; "
                                     f"have {steps}")
        return step

    def damage(self, step: int) -> str | None:
        """What is wrong with checkpoint ``step`` that a look at its files shows (None: nothing)."""
        root = self.manager.directory / str(step)
        missing = [name for name in _REQUIRED if not (root / name).exists()]
        return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing" if missing else None

    def _try_restore(self, step: int, abstract_state: Any) -> tuple[tuple[Any, dict] | None, str]:
        """((state, data), '') or (None, what is wrong with checkpoint ``step``)."""
        problem = self.damage(step)
        if problem is not None:
            return None, problem
        _drop_unfinished_reads()  # before: a failing read's siblings may report while it fails
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as e:  # orbax/tensorstore raise plain Exception and ValueError
            return None, f"its data cannot be read: {_root_cause(e)}"
        return (out.state, out.data), ""

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore onto the shardings given by ``abstract_state`` (ShapeDtypeStructs); a damaged
        checkpoint raises RunCheckpointError naming the step and the problem."""
        restored, problem = self._try_restore(step, abstract_state)
        if restored is None:
            others = [s for s in self.all_steps() if s != step]
            raise RunCheckpointError(
                f"checkpoint step {step} in {self.manager.directory} is damaged: {problem}; "
                f"use another checkpoint ({others or 'there is none'}) or a new workdir")
        return restored

    def restore_newest_intact(self, abstract_state: Any) -> Restored | None:
        """Restore the newest checkpoint that restores; newer damaged ones are moved aside.

        None when there are no checkpoints. If none restores, nothing is moved and the error names
        every step's problem (with intact files, the run's config is the likelier cause).
        """
        failures: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            restored, problem = self._try_restore(step, abstract_state)
            if restored is None:
                failures.append((step, problem))
                continue
            damaged = [(s, p, str(self._set_aside(s))) for s, p in failures]
            if damaged:
                if jax.process_count() > 1:  # process 0 moved them: everyone waits, then looks again
                    from jax.experimental import multihost_utils
                    multihost_utils.sync_global_devices("ftjax: damaged checkpoints moved aside")
                self.manager.reload()
            return Restored(step, *restored, damaged)
        if failures:
            raise RunCheckpointError(
                f"no checkpoint in {self.manager.directory} can be restored ("
                + "; ".join(f"step {s}: {p}" for s, p in failures)
                + "); if the files are intact, the config may not match the one that wrote them; "
                  "otherwise start a new workdir")
        return None

    def _set_aside(self, step: int) -> epath.Path:
        """Move checkpoint ``step`` to ``damaged-<step>`` (``.2``, ``.3``.. if that name is taken)."""
        target, n = self.manager.directory / f"damaged-{step}", 1
        while target.exists():
            n += 1
            target = self.manager.directory / f"damaged-{step}.{n}"
        if jax.process_index() == 0:
            (self.manager.directory / str(step)).rename(target)
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live pytree, as a restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
