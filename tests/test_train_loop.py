"""The spine end to end on configs/tiny.py: sharding equivalence, exact resume, SIGTERM, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ftjax.train.checkpoint import Checkpointer
import xla


REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "ftjax" / "configs" / "tiny.py"


def _losses(workdir: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out.setdefault(row["step"], []).append(row["train/loss"])
    return out


def _params_at(workdir: Path, step: int) -> dict:
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(workdir / "checkpoints") as mgr:
        restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored.state["params"]


def _flat(tree) -> dict:
    import jax
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _run_cli(workdir: Path, *overrides: str, wait: bool = True, devices: int = 8):
    env = dict(os.environ, XLA_FLAGS=xla.flags(devices),
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), f"--config={TINY}",
           f"--workdir={workdir}", *overrides]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(workdir: Path, step: int, proc, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (workdir / "metrics.jsonl").exists() and max(_losses(workdir) or [0]) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


# Batches of 4 rows x 32 tokens (tiny.py's are 16 x 64): a step of its 30k-vocabulary LM at the
# suite's -O0 takes seconds at full size, and nothing these tests check depends on the batch.
SMALL = dict(batch_size=4, seq_len=32)
COMMON = ("--config.log.every_steps=1", "--config.checkpoint.async_save=False",
          "--config.eval.max_batches=1", f"--config.train.batch_size={SMALL['batch_size']}",
          f"--config.data.seq_len={SMALL['seq_len']}")
SHARDED = 2  # devices of the kill / SIGTERM runs: sharded (fsdp=2) state, a quarter of 8's step time


def test_sharded_2x4_matches_single_device(tmp_path):
    from ftjax.train.loop import train
    from ftjax.configs.tiny import get_config

    losses = {}
    for name, mesh in (("one", dict(data=1, fsdp=1, tensor=1, num_devices=1)),
                       ("2x4", dict(data=1, fsdp=2, tensor=4, num_devices=0))):
        config = get_config("steps=5")
        config.mesh.update(mesh)
        config.train.batch_size, config.data.seq_len = SMALL["batch_size"], SMALL["seq_len"]
        config.log.every_steps = 1
        config.eval.max_batches = 2
        train(config, tmp_path / name)
        losses[name] = [v[-1] for _, v in sorted(_losses(tmp_path / name).items())]
    assert len(losses["one"]) == 5
    np.testing.assert_allclose(losses["2x4"], losses["one"], rtol=2e-5)
    assert losses["one"][-1] < losses["one"][0]


def test_kill_and_resume_is_exact(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    # The reference builds each batch in the loop; the killed run prefetches 3 ahead, so its
    # checkpoint must hold the consumed batch's data position, not the prefetched ones'.
    args = (*COMMON, "--config.checkpoint.every_steps=5", "--config.train.steps=10")
    r = _run_cli(full, *args, "--config.train.prefetch=0", devices=SHARDED)
    assert r.returncode == 0, r.stderr[-3000:]
    prefetch = "--config.train.prefetch=3"
    proc = _run_cli(killed, *args, prefetch, wait=False, devices=SHARDED)
    _wait_for_step(killed, 7, proc)
    assert (killed / "checkpoints" / "5").exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = _run_cli(killed, *args, prefetch, devices=SHARDED)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stdout + r.stderr

    a, b = _flat(_params_at(full, 10)), _flat(_params_at(killed, 10))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bitwise on CPU
    full_losses, killed_losses = _losses(full), _losses(killed)
    assert sorted(full_losses) == sorted(killed_losses) == list(range(1, 11))
    for step, values in killed_losses.items():  # steps 6.. were logged twice: before and after
        assert all(v == full_losses[step][0] for v in values), (step, values, full_losses[step])


def test_sigterm_saves_and_resumes(tmp_path):
    proc = _run_cli(tmp_path, *COMMON, "--config.train.steps=400", "--config.checkpoint.every_steps=1000",
                    wait=False, devices=SHARDED)
    _wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM" in out
    logged = max(_losses(tmp_path))
    from ftjax.configs.tiny import get_config
    ckpt = Checkpointer(tmp_path / "checkpoints", get_config().checkpoint)
    stopped = ckpt.latest_step()
    ckpt.close()
    assert stopped is not None and stopped >= 3 and stopped == logged
    r = _run_cli(tmp_path, *COMMON, f"--config.train.steps={stopped + 2}", devices=SHARDED)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    assert max(_losses(tmp_path)) == stopped + 2


def test_config_typo_fails_with_suggestion(tmp_path):
    r = _run_cli(tmp_path, "--config.train.stpes=5")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == \
        'error: config key train.stpes does not exist. Did you mean "train.steps"?'
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_bad_mesh_and_batch_fail_before_compile():
    from ftjax.configs.tiny import get_config
    from ftjax.sharding import MeshError
    from ftjax.train.experiment import ConfigError, build

    config = get_config()
    config.mesh.update(dict(data=3, fsdp=1, tensor=1))
    with pytest.raises(MeshError, match="needs 3 devices but 8 are available"):
        build(config)
    config = get_config()
    config.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    config.train.batch_size = 12
    with pytest.raises(ConfigError, match="not divisible by the 8 data-parallel shards"):
        build(config)
    config = get_config()
    config.train.batch_size, config.train.grad_accum = 16, 3
    with pytest.raises(ConfigError, match="not divisible by config.train.grad_accum=3"):
        build(config)
    config = get_config()
    config.model.remat = "bogus"
    with pytest.raises(ConfigError, match="config.model.remat='bogus'; choose from"):
        build(config)
