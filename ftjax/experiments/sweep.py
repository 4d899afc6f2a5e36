"""The arms of a config file's ``sweep()``, and running one arm as its own process.

``sweep()`` returns a list of dicts of dotted config overrides; an optional ``name`` names the
arm, an optional ``group`` says which arms are seeds of one method (default: the overrides
without ``train.seed``) and an optional ``resources`` says what the arm needs on a Ray cluster
(default: the config module's ``RESOURCES``, else one CPU). Each arm is the train command
(``python -m ftjax.commands.train``) in its own process and workdir (``DIR/arms/NAME``), so a
crash or OOM stays in its arm.

The arm's output goes to its own file, ``DIR/arms/NAME/train.log`` (for a ``gs://`` sweep, a
local spool file copied there when the arm ends); the runner tails it and
echoes the progress lines with an ``[NAME]`` prefix, so the arm never writes to a pipe that
dies with its runner. A runner asked to stop sends the arm SIGTERM (the train loop checkpoints
and exits); a runner that dies takes the arm down the same way (Linux: the parent-death signal
is SIGTERM), so the arm always leaves a checkpoint to resume from. A lock file held by the arm
process keeps a second runner (a rerun, a Ray retry) from starting the arm again until the
first process has exited. A finished arm (its ``run_summary.json`` covers all its steps) is not
run again; a failing arm is recorded with its error and the others go on. All arms share a
persistent XLA compilation cache: arms that differ only in traced values (learning rate, weight
decay, seed) compile to the same program and skip the compile.

With fusing on (``--fuse=auto``, the default), arms whose configs differ only in such values
(``ftjax.train.fused_plan.FUSABLE``) run as one group: one process
(``python -m ftjax.commands.train_fused``) trains them as one vmapped program and writes every
arm's folder as its own run would. It holds every arm's lock, logs to each arm's ``train.log``
and stops (SIGTERM) like an arm.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from etils import epath

from ftjax.errors import FtjaxError
from ftjax.paths import as_path, is_url

# Arms run the train command as a module of the installed package, from any directory.
TRAIN_COMMAND = (sys.executable, "-m", "ftjax.commands.train")
FUSED_COMMAND = (sys.executable, "-m", "ftjax.commands.train_fused")
SEED_KEY = "train.seed"
PROGRESS = ("[train]", "[eval]", "first step", "resumed", "mesh", "SIGTERM")
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class SweepError(FtjaxError):
    """A sweep that cannot run as asked: its config file, arms, workdir or devices."""


class SweepInterrupted(FtjaxError):
    """Arms were stopped before they finished; they resume from their checkpoints on a rerun."""

    exit_code = 130

    def __init__(self, statuses: dict[str, str]):
        self.statuses = statuses
        stopped = [n for n, s in statuses.items() if s == "interrupted"]
        waiting = [n for n, s in statuses.items() if s == "pending"]
        super().__init__(
            f"sweep interrupted: arm(s) {', '.join(stopped) or '-'} stopped at a checkpoint"
            + (f", {len(waiting)} not started" if waiting else "")
            + "; run the same command again to resume them")


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    group: str
    seed: int | None
    overrides: dict[str, Any]
    resources: dict[str, float] | None = None


def load_config_module(path: str | os.PathLike):
    path = Path(path)
    if not path.exists():
        raise SweepError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"ftjax_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _slug(overrides: dict[str, Any]) -> str:
    text = ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())
    return re.sub(r"[^A-Za-z0-9=,._-]+", "_", text) or "default"


def expand_arms(entries: list[dict[str, Any]], resources: dict[str, float] | None = None) -> list[Arm]:
    """Arms from ``sweep()`` entries, with unique names; ``resources`` is the default per arm."""
    arms, seen = [], set()
    for entry in entries:
        entry = dict(entry)
        name, group = entry.pop("name", None), entry.pop("group", None)
        arm_resources = entry.pop("resources", resources)
        seed = entry.get(SEED_KEY)
        group = group or _slug({k: v for k, v in entry.items() if k != SEED_KEY})
        name = name or _slug(entry)
        if name in seen:
            raise SweepError(f"sweep arm name {name!r} appears twice; give arms distinct names")
        seen.add(name)
        arms.append(Arm(name=name, group=group, seed=seed, overrides=entry,
                        resources=dict(arm_resources) if arm_resources else None))
    return arms


def sweep_dir(workdir: str | os.PathLike) -> epath.Path:
    """The sweep folder: an absolute local path, or a URL (``gs://``) left as it is."""
    return as_path(workdir)


def local_side(path: epath.Path) -> epath.Path:
    """Where an arm's ``train.log`` and ``arm.lock`` live while it runs.

    A process writes its output to a file and a lock needs a file system, so for an arm folder
    on an object store they live in a local spool folder named after the URL (its log is copied
    into the arm folder when the arm ends); a local or mounted arm folder holds them itself.
    """
    if not is_url(path):
        return path
    digest = hashlib.sha1(os.fspath(path).encode()).hexdigest()[:16]
    return epath.Path(tempfile.gettempdir()) / "ftjax-sweeps" / f"{path.name}-{digest}"


def arm_dir(workdir: str | os.PathLike, arm: Arm) -> epath.Path:
    return sweep_dir(workdir) / "arms" / arm.name


def write_manifest(workdir: str | os.PathLike, config_arg: str, arms: list[Arm]) -> None:
    """``DIR/sweep.json``: the config and every arm, for the record and the report."""
    root = sweep_dir(workdir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps(
        {"config": config_arg, "arms": [dataclasses.asdict(a) for a in arms]}, indent=2))


def arm_command(config_arg: str, arm: Arm, workdir: epath.Path) -> list[str]:
    """The train command of ``arm`` in its ``workdir`` (``DIR/arms/NAME``); its W&B run (when
    ``log.wandb``) goes in a group named after the sweep folder unless the arm sets one."""
    overrides = {"log.wandb_group": workdir.parent.parent.name, **arm.overrides}
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    return [*TRAIN_COMMAND, f"--config={config_arg}", f"--workdir={workdir}", *flags]


def arm_configs(config_arg: str, workdir: str | os.PathLike, names: list[str] | None = None
                ) -> list[tuple[Arm, Any]]:
    """The sweep's arms (those in ``names``, default all) with the configs their train command
    would build (overrides applied, W&B group as in ``arm_command``)."""
    from ftjax.train.fused_plan import with_overrides

    path, _, arg = config_arg.partition(":")
    module = load_config_module(path)
    entries = module.sweep(arg or None) if module.sweep.__code__.co_argcount else module.sweep()
    arms = expand_arms(entries, resources=getattr(module, "RESOURCES", None))
    if names is not None:
        unknown = sorted(set(names) - {a.name for a in arms})
        if unknown:
            raise SweepError(f"arms {unknown} are not in {path}'s sweep()")
        arms = [a for a in arms if a.name in names]
    base = module.get_config(arg or None)
    group = {"log.wandb_group": sweep_dir(workdir).name}
    return [(a, with_overrides(base, {**group, **a.overrides})) for a in arms]


def fusion_groups(config_arg: str, workdir: str | os.PathLike, arms: list[Arm],
                  max_arms: int = 0) -> list[list[Arm]]:
    """``arms`` split into groups that train as one program (singletons run as today), at most
    ``max_arms`` per group (0: no limit)."""
    from ftjax.train.fused_plan import group_by_program, program_key

    keys = {a.name: program_key(c) for a, c in arm_configs(config_arg, workdir, [a.name for a in arms])}
    return group_by_program(arms, lambda a: keys[a.name], max_arms)


def group_command(config_arg: str, arms: list[Arm], workdir: str | os.PathLike,
                  max_arms: int = 0) -> list[str]:
    """The fused train command of ``arms`` in the sweep folder ``workdir``."""
    return [*FUSED_COMMAND, f"--config={config_arg}", f"--workdir={sweep_dir(workdir)}",
            f"--arms={','.join(a.name for a in arms)}", f"--max_arms={max_arms}"]


def cache_env(workdir: str | os.PathLike) -> dict[str, str]:
    """Unbuffered output and the persistent XLA cache every arm of the sweep shares."""
    return dict(PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(sweep_dir(workdir) / "xla_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def arm_status(path: str | os.PathLike) -> str:
    """'done' (its summary covers every step of its config), 'failed' or 'pending'.

    A run stopped by SIGTERM also writes ``run_summary.json``; its step count tells them apart.
    """
    path = as_path(path)
    summary, config = path / "run_summary.json", path / "config.json"
    if summary.exists():
        steps = json.loads(config.read_text())["train"]["steps"] if config.exists() else 0
        if json.loads(summary.read_text())["steps"] >= steps:
            return "done"
    if (path / "error.txt").exists():
        return "failed"
    return "pending"


def run_arm(config_arg: str, arm: Arm, workdir: str | os.PathLike, *,
            env: Mapping[str, str] | None = None, echo: Callable[[str], None] = print,
            stop: Callable[[], bool] = lambda: False, retry_failed: bool = False,
            where: str | None = None) -> str:
    """Run ``arm``'s train.py in ``DIR/arms/NAME`` until it ends or ``stop()`` turns true.

    Returns 'done', 'failed' (see ``error.txt``), 'interrupted' (stopped at a checkpoint; a rerun
    resumes it) or 'pending' (stopped before it started). A KeyboardInterrupt (Ray's task
    cancellation) stops the arm like ``stop()``.
    """
    say = lambda message: echo(f"[{arm.name}] {message}")  # noqa: E731
    path = arm_dir(workdir, arm)
    status = arm_status(path)
    if status == "done" or (status == "failed" and not retry_failed):
        say(f"{status}, skipped")
        return status
    if stop():
        return status
    path.mkdir(parents=True, exist_ok=True)
    local_side(path).mkdir(parents=True, exist_ok=True)
    lock = _acquire(local_side(path) / "arm.lock", say, stop)
    if lock is None:
        return arm_status(path)
    try:
        if arm_status(path) == "done":  # an earlier runner's process finished it while we waited
            say("done, skipped")
            return "done"
        return _run_locked(config_arg, arm, path, lock, env, say, stop, where or socket.gethostname())
    finally:
        os.close(lock)


def _run_locked(config_arg: str, arm: Arm, path: epath.Path, lock: int, env: Mapping[str, str] | None,
                say: Callable[[str], None], stop: Callable[[], bool], where: str) -> str:
    """Start the arm's process (holding ``lock``), echo its progress, forward ``stop()``."""
    return _run_process(arm_command(config_arg, arm, path), [arm], [path], [lock], env, say, stop,
                        where)[arm.name]


def _run_process(cmd: list[str], arms: list[Arm], paths: list[epath.Path], locks: list[int],
                 env: Mapping[str, str] | None, say: Callable[[str], None], stop: Callable[[], bool],
                 where: str) -> dict[str, str]:
    """Run ``cmd`` (the train process of ``arms``, holding their ``locks``), logging to the first
    arm's ``train.log`` (copied to the others' when it ends); each arm's status."""
    for arm, path in zip(arms, paths):
        (path / "error.txt").unlink(missing_ok=True)
        (path / "arm.json").write_text(json.dumps(dataclasses.asdict(arm), indent=2))
    log_path = os.fspath(local_side(paths[0]) / "train.log")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} on {where}, runner pid {os.getpid()}: "
                  f"{' '.join(cmd)}\n")
        start_offset = log.tell()
        say(f"starting on {where}; log {log_path}")
        start = time.time()
        proc = subprocess.Popen(cmd, env=dict(env if env is not None else os.environ),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, pass_fds=tuple(locks),
                                preexec_fn=_die_with_parent(os.getpid()))
    tail, lines, stopped = _Tail(log_path, start_offset), collections.deque(maxlen=60), False
    while True:
        try:
            code = proc.poll()
            for line in tail.lines():
                lines.append(line)
                if line.startswith(PROGRESS):
                    say(line)
            if code is not None:
                break
            if stop() and not stopped:
                stopped = True
                proc.send_signal(signal.SIGTERM)
                say("stopping: asked the arm to checkpoint and exit")
            time.sleep(0.2)
        except KeyboardInterrupt:
            stop = lambda: True  # noqa: E731
    tail.close()
    text = epath.Path(log_path).read_text()
    for path in paths:
        if is_url(path):
            (path / "train.log").write_text(text)
    for path in paths[1:]:
        if not is_url(path):
            with open(os.fspath(local_side(path) / "train.log"), "a", encoding="utf-8") as f:
                f.write(text[start_offset:] if len(text) >= start_offset else text)
    out = {}
    for arm, path in zip(arms, paths):
        status = arm_status(path)
        if status == "done":
            say(f"done in {time.time() - start:.0f}s")
            out[arm.name] = "done"
        elif code == 0 or stopped:
            say(f"interrupted (exit {code}); run the sweep again to resume it from its checkpoint")
            out[arm.name] = "interrupted"
        else:
            (path / "error.txt").write_text(f"exit code {code}\n" + "\n".join(lines))
            say(f"FAILED (exit {code}); see {path / 'error.txt'}")
            out[arm.name] = "failed"
    return out


def run_group(config_arg: str, arms: list[Arm], workdir: str | os.PathLike, *,
              env: Mapping[str, str] | None = None, echo: Callable[[str], None] = print,
              stop: Callable[[], bool] = lambda: False, retry_failed: bool = False,
              max_arms: int = 0, where: str | None = None) -> dict[str, str]:
    """Run ``arms`` as one fused process (``run_arm`` when only one is left to run); each arm's
    status as ``run_arm`` gives it."""
    statuses = {a.name: arm_status(arm_dir(workdir, a)) for a in arms}
    todo = [a for a in arms if statuses[a.name] == "pending"
            or (statuses[a.name] == "failed" and retry_failed)]
    if len(todo) <= 1:  # run_arm also reports the done / failed arms as skipped
        return {a.name: run_arm(config_arg, a, workdir, env=env, echo=echo, stop=stop,
                                retry_failed=retry_failed, where=where) for a in arms}
    for a in arms:
        if a not in todo:
            echo(f"[{a.name}] {statuses[a.name]}, skipped")
    name = f"fused:{todo[0].name}+{len(todo) - 1}"
    say = lambda message: echo(f"[{name}] {message}")  # noqa: E731
    paths = [arm_dir(workdir, a) for a in todo]
    locks: list[int] = []
    try:
        for path in paths:
            path.mkdir(parents=True, exist_ok=True)
            local_side(path).mkdir(parents=True, exist_ok=True)
            lock = _acquire(local_side(path) / "arm.lock", say, stop)
            if lock is None:
                return {**statuses, **{a.name: arm_status(arm_dir(workdir, a)) for a in todo}}
            locks.append(lock)
        cmd = group_command(config_arg, todo, workdir, max_arms)
        statuses.update(_run_process(cmd, todo, paths, locks, env, say, stop,
                                     where or socket.gethostname()))
        return statuses
    finally:
        for lock in locks:
            os.close(lock)


def _acquire(lock_path: epath.Path, say: Callable[[str], None], stop: Callable[[], bool]) -> int | None:
    """An fd holding the arm's lock, or None if ``stop()`` turned true while another held it."""
    fd = os.open(os.fspath(lock_path), os.O_RDWR | os.O_CREAT, 0o644)
    waiting = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if stop():
                    os.close(fd)
                    return None
                if not waiting:
                    say("waiting for an earlier run of this arm to exit")
                    waiting = True
                time.sleep(0.5)
    except BaseException:
        os.close(fd)
        raise


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A preexec hook: the arm gets SIGTERM (checkpoint and exit) when its runner dies."""
    if _LIBC is None:
        return None

    def hook() -> None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the runner died before the hook ran
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


class _Tail:
    """The complete lines appended to a file since ``offset``."""

    def __init__(self, path: str, offset: int):
        self._file = open(path, encoding="utf-8", errors="replace")
        self._file.seek(offset)
        self._partial = ""

    def lines(self) -> list[str]:
        text = self._partial + self._file.read()
        *done, self._partial = text.split("\n")
        return [line.rstrip() for line in done]

    def close(self) -> None:
        self._file.close()
