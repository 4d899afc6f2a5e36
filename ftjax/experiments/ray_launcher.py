"""Sweep arms as Ray tasks: Ray schedules them on a cluster's nodes and retries lost ones.

Each arm is one task that runs the same train command as the local launcher, in
the arm's folder of the sweep workdir (storage every node mounts at the same path), and asks
Ray for the arm's ``resources`` (``{"CPU": 2}``, ``{"GPU": 1}``, ``{"TPU": 4}``; Ray then sets
``CUDA_VISIBLE_DEVICES`` / ``TPU_VISIBLE_CHIPS`` for it). A task whose node dies is retried up
to ``max_retries`` times on another node, where train.py resumes from the arm's last checkpoint;
the arm's lock keeps a retry from starting while a process of the lost attempt is still saving.
The task's progress lines reach the driver through Ray's log forwarding. Stopping the sweep
cancels the tasks: Ray raises KeyboardInterrupt in each, which sends the arm SIGTERM.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

from ftjax.errors import require
from ftjax.experiments import sweep
from ftjax.experiments.launchers import Launcher
from ftjax.experiments.sweep import Arm


def ray_options(resources: dict[str, float] | None) -> dict[str, Any]:
    """``.options()`` for an arm's resources: CPU/GPU/memory by keyword, the rest (TPU, custom)
    as ``resources``."""
    rest = dict(resources or {})
    opts: dict[str, Any] = {"num_cpus": rest.pop("CPU", 1), "num_gpus": rest.pop("GPU", 0)}
    if "memory" in rest:
        opts["memory"] = rest.pop("memory")
    if rest:
        opts["resources"] = rest
    return opts


def _arm_task(config_arg: str, arm: Arm, workdir: str, retry_failed: bool) -> str:
    """The Ray task: one arm on whichever node Ray chose."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    return sweep.run_arm(config_arg, arm, workdir, env=dict(os.environ, **sweep.cache_env(workdir)),
                         echo=lambda line: print(line, flush=True), retry_failed=retry_failed,
                         where=f"{socket.gethostname()} (Ray node {node})")


def _driver_settings(address: str | None) -> None:
    """Settings Ray reads when it is imported: print every arm's progress lines (Ray would fold
    lines that differ only in numbers, as arm names often do, into one), and keep a loopback
    cluster address on loopback (Ray's driver swaps in this machine's outward IP unless told it
    is on a one-machine platform)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address and address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


class RayLauncher(Launcher):
    """Arms as Ray tasks on the cluster at ``address`` (None: a fresh local Ray instance)."""

    def __init__(self, config_arg: str, workdir: str | os.PathLike, *, address: str | None = None,
                 max_retries: int = 3, echo: Callable[[str], None] = print, retry_failed: bool = False):
        _driver_settings(address)
        ray = require("ray", "ray", "--launcher=ray")

        super().__init__(config_arg, workdir, echo=echo, retry_failed=retry_failed)
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=True,
                     **({} if address else {"include_dashboard": False}))
        self.concurrency = 1 << 16  # Ray queues the tasks; a driver thread waits on each
        self.max_retries = max_retries
        self._task = ray.remote(_arm_task)

    def run_arm(self, arm: Arm) -> str:
        import ray
        from ray.exceptions import RayError, TaskCancelledError

        path = sweep.arm_dir(self.workdir, arm)
        if self._stopping.is_set():
            return sweep.arm_status(path)
        stop = self._stop_flag(arm)
        ref = self._task.options(name=f"arm {arm.name}", max_retries=self.max_retries,
                                 retry_exceptions=False, **ray_options(arm.resources)).remote(
            self.config_arg, arm, self.workdir, self.retry_failed)
        cancelled = False
        try:
            while not ray.wait([ref], timeout=1.0)[0]:
                if not cancelled and stop():
                    ray.cancel(ref)
                    cancelled = True
            return ray.get(ref)
        except TaskCancelledError:
            return "interrupted" if (path / "train.log").exists() else "pending"
        except RayError as e:  # lost after max_retries, or the task itself raised
            path.mkdir(parents=True, exist_ok=True)
            (path / "error.txt").write_text(f"Ray task failed at {time.strftime('%H:%M:%S')}\n{e}\n")
            self.echo(f"[{arm.name}] FAILED on Ray: {str(e).splitlines()[0]}")
            return "failed"
