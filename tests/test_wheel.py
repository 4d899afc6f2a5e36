"""ftjax as a researcher installs it: a wheel built from the tree, installed (no -e) into a fresh
venv outside the checkout, runs the tiny config by name, a 2-arm sweep (arms grouped in W&B,
offline) and an export pushed to a stand-in Hub, all from a directory that is not the checkout.

The venv sees the test environment's installed dependencies through a .pth file (nothing is
downloaded); that environment's editable ftjax does not leak in: .pth files of a directory a
.pth file adds are not processed, and the test checks where ftjax is imported from."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.hub_standin import StandInHub, folder_files
from tests.wandb_offline import offline_env, offline_runs, read_run
import xla

REPO = Path(__file__).resolve().parents[1]
FAST = ["--config.train.steps=2", "--config.eval.max_batches=1", "--config.mesh.num_devices=1"]
SWEEP_CONFIG = '''
from ftjax.configs.tiny import get_config as _tiny


def get_config(arg=None):
    c = _tiny(arg)
    c.train.steps, c.eval.max_batches, c.mesh.num_devices = 2, 1, 1
    return c


def sweep():
    return [{"name": f"seed{s}", "train.seed": s, "log.wandb": True} for s in (0, 1)]
'''


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv outside the checkout with the wheel of the tree installed."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    shutil.copytree(REPO / "ftjax", src / "ftjax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "requirements.txt", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", src],
                   check=True, timeout=120)
    (wheel,) = (root / "dist").glob("ftjax-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
    site = Path(sysconfig.get_path("purelib", vars={"base": venv, "platbase": venv}))
    (site / "test_env_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([*pip, "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index", wheel],
                   check=True, timeout=120)
    return venv


def _run(cmd, cwd, env, timeout=240):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_installed_wheel_trains_sweeps_and_exports(venv, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    bin_ = venv / "bin"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(offline_env(tmp_path / "wandb_home"), HF_TOKEN="hf_standin",
               XLA_FLAGS=xla.flags(1))
    where = _run([bin_ / "python", "-c", "import ftjax, ftjax.configs; print(ftjax.__file__)"], work, env)
    assert Path(where.strip()).is_relative_to(venv), where

    _run([bin_ / "ftjax-train", "--config=tiny", "--workdir=run", *FAST], work, env)
    assert (work / "run" / "run_summary.json").is_file() and (work / "run" / "eval" / "metrics.json").is_file()

    (work / "sweep2.py").write_text(SWEEP_CONFIG)
    out = _run([bin_ / "ftjax-sweep", "--config=sweep2.py", "--workdir=sw", "--parallel=2"], work, env)
    assert "report:" in out
    assert {"seed0", "seed1"} <= set((work / "sw" / "results.csv").read_text().replace(",", " ").split())
    for arm in ("seed0", "seed1"):
        (wandb_run,) = offline_runs(work / "sw" / "arms" / arm)
        run, history = read_run(wandb_run)
        assert (run["display_name"], run["run_group"]) == (arm, "sw")
        assert "train/loss" in history[2]

    with StandInHub() as hub:
        _run([bin_ / "ftjax-export", "--workdir=run", "--format=hf", "--out=export",
              "--push_to_hub=ftjax-test/tiny", f"--hub_endpoint={hub.url}"], work, env)
        assert hub.repos["ftjax-test/tiny"] == folder_files(work / "export")
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub.repos["ftjax-test/tiny"])
