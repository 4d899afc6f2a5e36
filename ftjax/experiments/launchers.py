"""Where a sweep's arms run: local processes on this machine, or Ray tasks on a cluster.

A launcher has three calls: ``run(arms) -> {name: status}`` runs them all (SIGTERM/SIGINT to
the sweep stops every running arm at a checkpoint, and then ``run`` raises
``SweepInterrupted``), ``run_arm(arm) -> status`` runs one to its end (blocking; the search
driver calls it from its own threads) and ``stop_arm(arm)`` asks a running arm to checkpoint and
exit. A status is 'done', 'failed', 'interrupted' (stopped at a checkpoint) or 'pending'.
The local launcher with ``fuse`` set runs arms that fuse (``sweep.fusion_groups``) as one
process each (``run_group``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import signal
import threading
from typing import Callable, Iterator, Mapping

from ftjax.experiments import sweep
from ftjax.experiments.sweep import Arm, SweepError, SweepInterrupted

MESH_CONTROLLER_PORT = 8476
# TPU_CHIPS_PER_PROCESS_BOUNDS for a process that owns this many chips of a TPU VM.
TPU_CHIP_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}


@contextlib.contextmanager
def forward_signals(handler: Callable[[], None]) -> Iterator[None]:
    """Call ``handler`` on SIGTERM or SIGINT (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda *_: handler()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Launcher:
    """Runs arms ``concurrency`` at a time through ``run_arm``; subclasses say where and how."""

    concurrency = 1

    def __init__(self, config_arg: str, workdir: str | os.PathLike, *,
                 echo: Callable[[str], None] = print, retry_failed: bool = False):
        self.config_arg, self.workdir = config_arg, os.fspath(sweep.sweep_dir(workdir))
        self.echo, self.retry_failed = echo, retry_failed
        self._stopping = threading.Event()
        self._stops: dict[str, threading.Event] = {}

    def run(self, arms: list[Arm]) -> dict[str, str]:
        """Run every arm; raises SweepInterrupted when any arm stopped before its end."""
        sweep.write_manifest(self.workdir, self.config_arg, arms)
        units = self.units(arms)
        with forward_signals(self.stop_all), \
                concurrent.futures.ThreadPoolExecutor(max(1, min(self.concurrency, len(units)))) as pool:
            done: dict[str, str] = {}
            for result in pool.map(self._run_unit, units):
                done.update(result)
        statuses = {a.name: done[a.name] for a in arms}
        if self._stopping.is_set() or "interrupted" in statuses.values():
            raise SweepInterrupted(statuses)
        return statuses

    def stop_all(self) -> None:
        """Stop every running arm at a checkpoint and start no more."""
        if not self._stopping.is_set():
            self.echo("sweep: stopping; every running arm checkpoints and exits")
        self._stopping.set()

    def units(self, arms: list[Arm]) -> list[list[Arm]]:
        """What runs as one process: every arm alone (a launcher that fuses groups them)."""
        return [[a] for a in arms]

    def _run_unit(self, unit: list[Arm]) -> dict[str, str]:
        return {unit[0].name: self.run_arm(unit[0])} if len(unit) == 1 else self.run_group(unit)

    def run_arm(self, arm: Arm) -> str:
        raise NotImplementedError

    def run_group(self, arms: list[Arm]) -> dict[str, str]:
        raise NotImplementedError

    def stop_arm(self, arm: Arm) -> None:
        """Ask ``arm``, when running, to checkpoint and exit."""
        if arm.name in self._stops:
            self._stops[arm.name].set()

    def _stop_flag(self, arm: Arm) -> Callable[[], bool]:
        """True once ``stop_arm(arm)`` or ``stop_all()`` was called (from this run of the arm on)."""
        event = self._stops[arm.name] = threading.Event()
        return lambda: event.is_set() or self._stopping.is_set()


class LocalLauncher(Launcher):
    """Arms as processes on this machine, ``parallel`` at a time, each on its own devices when
    ``devices_per_arm`` is set (else every arm sees every device)."""

    def __init__(self, config_arg: str, workdir: str | os.PathLike, *, parallel: int = 1,
                 devices_per_arm: int = 0, fuse: int | None = None, **kwargs):
        """``fuse``: None runs every arm alone; 0 fuses every group of arms that compile to one
        program (as many at a time as fit in memory); N > 0 at most N arms a group."""
        super().__init__(config_arg, workdir, **kwargs)
        self.concurrency, self.devices_per_arm = max(1, parallel), devices_per_arm
        self.fuse = fuse
        for slot in range(self.concurrency):  # fail now, not in the middle of the sweep
            device_env(slot, devices_per_arm)
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.concurrency):
            self._slots.put(slot)

    def run_arm(self, arm: Arm) -> str:
        stop = self._stop_flag(arm)
        slot = self._slots.get()
        try:
            env = dict(os.environ, **sweep.cache_env(self.workdir),
                       **device_env(slot, self.devices_per_arm))
            return sweep.run_arm(self.config_arg, arm, self.workdir, env=env, echo=self.echo,
                                 stop=stop,
                                 retry_failed=self.retry_failed)
        finally:
            self._slots.put(slot)

    def units(self, arms: list[Arm]) -> list[list[Arm]]:
        if self.fuse is None:
            return super().units(arms)
        groups = sweep.fusion_groups(self.config_arg, self.workdir, arms, self.fuse)
        for g in groups:
            if len(g) > 1:
                self.echo(f"sweep: fusing {len(g)} arms into one program: {', '.join(a.name for a in g)}")
        return groups

    def run_group(self, arms: list[Arm]) -> dict[str, str]:
        flags = [self._stop_flag(a) for a in arms]
        slot = self._slots.get()
        try:
            env = dict(os.environ, **sweep.cache_env(self.workdir),
                       **device_env(slot, self.devices_per_arm))
            return sweep.run_group(self.config_arg, arms, self.workdir, env=env, echo=self.echo,
                                   stop=lambda: any(f() for f in flags),
                                   retry_failed=self.retry_failed, max_arms=self.fuse or 0)
        finally:
            self._slots.put(slot)


def device_env(slot: int, devices_per_arm: int,
               environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables that show the arm in ``slot`` only its own ``devices_per_arm`` accelerators.

    GPUs: ``CUDA_VISIBLE_DEVICES`` (a subset of the one already set, if any). TPU VM chips:
    ``TPU_VISIBLE_CHIPS`` with the process bounds of that many chips (1, 2, 4 or 8) and a mesh
    controller port of its own. Each platform ignores the other's variables. 0: every device.
    """
    if devices_per_arm <= 0:
        return {}
    ids = range(slot * devices_per_arm, (slot + 1) * devices_per_arm)
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [str(i) for i in ids]
    if visible:
        pool = [d for d in visible.split(",") if d]
        if ids.stop > len(pool):
            raise SweepError(f"arm slot {slot} needs devices {ids.start}-{ids.stop - 1} but "
                             f"CUDA_VISIBLE_DEVICES={visible} has {len(pool)}; lower --parallel or "
                             "--devices_per_arm")
        gpus = [pool[i] for i in ids]
    env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    if devices_per_arm in TPU_CHIP_BOUNDS:  # a TPU VM splits into 1, 2, 4 or 8 chips a process
        port = MESH_CONTROLLER_PORT + slot
        env.update(TPU_VISIBLE_CHIPS=",".join(str(i) for i in ids),
                   TPU_CHIPS_PER_PROCESS_BOUNDS=TPU_CHIP_BOUNDS[devices_per_arm],
                   TPU_PROCESS_BOUNDS="1,1,1", TPU_MESH_CONTROLLER_ADDRESS=f"localhost:{port}",
                   TPU_MESH_CONTROLLER_PORT=str(port))
    return env


def make_launcher(kind: str, config_arg: str, workdir: str | os.PathLike, *, parallel: int = 1,
                  devices_per_arm: int = 0, ray_address: str | None = None, max_retries: int = 3,
                  retry_failed: bool = False, echo: Callable[[str], None] = print,
                  fuse: int | None = None) -> Launcher:
    """The launcher ``--launcher`` names: 'local' (default) or 'ray' (arms never fused there)."""
    if kind == "local":
        return LocalLauncher(config_arg, workdir, parallel=parallel, devices_per_arm=devices_per_arm,
                             retry_failed=retry_failed, echo=echo, fuse=fuse)
    if kind == "ray":
        from ftjax.experiments.ray_launcher import RayLauncher
        return RayLauncher(config_arg, workdir, address=ray_address, max_retries=max_retries,
                           retry_failed=retry_failed, echo=echo)
    raise SweepError(f"--launcher={kind!r} is not 'local' or 'ray'")
