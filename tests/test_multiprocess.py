"""Two local processes x 4 CPU devices (jax.distributed, gloo collectives) == 1 process x 8."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import xla


REPO = Path(__file__).resolve().parents[1]
ARGS = ["--config.train.steps=4", "--config.log.every_steps=1", "--config.checkpoint.every_steps=2",
        "--config.checkpoint.async_save=False", "--config.eval.max_batches=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "train.py"), "--config=tiny",
            f"--workdir={workdir}", *ARGS, *extra]


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=xla.flags(devices))


def _losses(workdir: Path) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_two_processes_match_one(tmp_path):
    single = subprocess.run(_cmd(tmp_path / "single"), env=_env(8), capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    multi = tmp_path / "multi"
    procs = [subprocess.Popen(
        _cmd(multi, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
        env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "on 8 devices (2 processes)" in outs[0]
    assert not outs[1].strip() or "step" not in outs[1]  # only process 0 logs
    np.testing.assert_allclose(_losses(multi), _losses(tmp_path / "single"), rtol=1e-5)
    assert len(_losses(multi)) == 4
    assert sorted(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
