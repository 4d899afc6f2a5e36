"""Two local processes x 4 CPU devices (jax.distributed, gloo collectives) == 1 process x 8 (the
reference runs in the test's own process, on conftest's 8 devices: one process start fewer)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import xla


REPO = Path(__file__).resolve().parents[1]
# 8 rows (one per data-parallel device) of 32 tokens: tiny.py's 16 x 64 make each step of its
# 30k-vocabulary LM seconds long.
OVERRIDES = {"train.steps": 4, "log.every_steps": 1, "checkpoint.every_steps": 2,
             "checkpoint.async_save": False, "eval.max_batches": 2, "train.batch_size": 8,
             "data.seq_len": 32}
ARGS = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]


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


def _train_in_process(workdir: Path) -> None:
    """The 1 x 8 reference: the same config and overrides, in this process (conftest's 8 devices)."""
    from ftjax.configs.tiny import get_config
    from ftjax.train.loop import train

    config = get_config()
    config.update_from_flattened_dict(OVERRIDES)
    train(config, workdir)


def test_two_processes_match_one(tmp_path):
    _train_in_process(tmp_path / "single")

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
