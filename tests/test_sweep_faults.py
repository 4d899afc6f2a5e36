"""A sweep stopped as a whole, one arm's history: the runner SIGKILLed mid-arm (the arm is not
taken down by a broken pipe: it saves a checkpoint), a rerun resumes from it and is sent SIGTERM
(it reaches the arm, which checkpoints; the sweep exits 130 naming it), and a last rerun resumes
from that checkpoint and finishes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import xla

REPO = Path(__file__).resolve().parents[1]
STEPS = 200
# Arms run on one CPU device (not the 8 fake ones of conftest): fast steps on a shared machine.
ARM_ENV = dict(os.environ, XLA_FLAGS=xla.flags())

CONFIG = '''
import sys
sys.path.insert(0, {repo!r})
from ftjax.configs.tiny import get_config as tiny

def get_config(arg=None):
    c = tiny("steps=200")
    c.data.seq_len, c.train.batch_size = 16, 2
    c.eval.max_batches, c.log.every_steps, c.log.tensorboard = 1, 10, False
    c.checkpoint.every_steps, c.checkpoint.async_save = 50, False
    return c

def sweep():
    return [{{"name": "long", "train.learning_rate": 0.003}}]
'''


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep_faults") / "faults_config.py"
    path.write_text(CONFIG.format(repo=str(REPO)))
    return path


def start_sweep(config: Path, workdir: Path) -> tuple[subprocess.Popen, Path]:
    out = workdir.parent / f"{workdir.name}.out"
    cmd = [sys.executable, str(REPO / "scripts" / "sweep.py"), f"--config={config}", f"--workdir={workdir}"]
    return subprocess.Popen(cmd, stdout=open(out, "w"), stderr=subprocess.STDOUT, env=ARM_ENV), out


def wait_for_training(proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Until this run of the arm has logged a train step (mid-arm, with steps left to go)."""
    deadline, before = time.time() + timeout, len(log.read_text()) if log.exists() else 0
    while time.time() < deadline:
        if log.exists() and "[train] step" in log.read_text()[before:]:
            return
        assert proc.poll() is None, "the sweep ended before its arm trained"
        time.sleep(0.2)
    raise AssertionError(f"no train step in {log} after {timeout}s")


def checkpoint_steps(arm: Path) -> list[int]:
    return sorted(int(p.name) for p in (arm / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def killed(config, tmp_path_factory) -> tuple[Path, int]:
    """A sweep SIGKILLed while its arm trains: (workdir, the checkpoint step the arm saved)."""
    workdir = tmp_path_factory.mktemp("faults") / "sweep"
    log = workdir / "arms" / "long" / "train.log"
    proc, _ = start_sweep(config, workdir)
    try:
        wait_for_training(proc, log)
        arms = [p for p in psutil.Process(proc.pid).children(recursive=True)
                if "ftjax.commands.train" in p.cmdline()]
        assert len(arms) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(arms, timeout=180)
        assert not alive, "the arm did not stop"
    finally:
        proc.kill()
    steps = checkpoint_steps(workdir / "arms" / "long")
    return workdir, steps[-1] if steps else 0


def test_sigkill_of_the_runner_leaves_the_arm_a_checkpoint(killed):
    workdir, saved = killed
    text = (workdir / "arms" / "long" / "train.log").read_text()
    assert "Broken pipe" not in text and "BrokenPipeError" not in text and "Traceback" not in text, text
    assert 0 < saved < STEPS and f"SIGTERM: saved a checkpoint at step {saved}" in text, text[-2000:]


@pytest.fixture(scope="module")
def interrupted(config, killed) -> tuple[Path, int, int, str]:
    """The rerun, sent SIGTERM once the arm trains again: (workdir, the step it resumed from,
    its exit code, its output)."""
    workdir, resumed = killed
    proc, out = start_sweep(config, workdir)
    try:
        wait_for_training(proc, workdir / "arms" / "long" / "train.log")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=180)
    finally:
        proc.kill()
    return workdir, resumed, code, out.read_text()


def test_sigterm_reaches_the_arm_which_checkpoints(interrupted):
    workdir, resumed, code, output = interrupted
    arm = workdir / "arms" / "long"
    saved = checkpoint_steps(arm)[-1]
    log = (arm / "train.log").read_text()
    assert code == 130, output  # SweepInterrupted.exit_code
    assert f"resumed from {arm / 'checkpoints'} at step {resumed}" in log  # the SIGKILL's checkpoint
    assert resumed < saved < STEPS and f"SIGTERM: saved a checkpoint at step {saved}" in log
    assert "sweep interrupted: arm(s) long stopped at a checkpoint" in output, output[-2000:]
    assert not (workdir / "results.csv").exists()


def test_rerun_resumes_the_interrupted_arm_and_finishes(interrupted, config):
    workdir = interrupted[0]
    arm = workdir / "arms" / "long"
    saved = checkpoint_steps(arm)[-1]
    proc, out = start_sweep(config, workdir)
    try:
        assert proc.wait(timeout=300) == 0, out.read_text()[-3000:]
    finally:
        proc.kill()
    log = (arm / "train.log").read_text()
    assert f"resumed from {arm / 'checkpoints'} at step {saved}" in log
    summary = json.loads((arm / "run_summary.json").read_text())
    assert (summary["resumed_from_step"], summary["steps"]) == (saved, STEPS)
    rows = [json.loads(line) for line in (arm / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(10, STEPS + 1, 10))  # none twice
    assert f"[long] [train] step {STEPS}/{STEPS}" in out.read_text()  # progress streamed from the log file
    assert (workdir / "results.csv").exists()
