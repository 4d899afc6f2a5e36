"""Sweeps on a real two-node Ray cluster on 127.0.0.1: a worker node dies mid-arm, Ray retries
the arm on the head node, it resumes from its checkpoint, and the report equals the local
launcher's on the same arms."""

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

ray = pytest.importorskip("ray")
from ray._private import ray_constants  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from ftjax.experiments.ray_launcher import ray_options  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 60, 5

CONFIG = '''
import sys
sys.path.insert(0, {repo!r})
from configs.tiny import get_config as tiny

RESOURCES = {{"CPU": 1}}

def get_config(arg=None):
    c = tiny("steps={steps}")
    c.data.seq_len, c.train.batch_size = 16, 2
    c.eval.max_batches, c.log.every_steps, c.log.tensorboard = 1, {every}, False
    c.checkpoint.every_steps, c.checkpoint.async_save = {every}, False
    return c

def sweep():
    return [{{"name": f"lr{{lr}}-s{{s}}", "group": f"lr{{lr}}", "train.learning_rate": lr,
              "train.seed": s}} for lr in (0.003, 0.001) for s in (0, 1)]
'''


def test_ray_options_split_resources():
    assert ray_options(None) == {"num_cpus": 1, "num_gpus": 0}
    assert ray_options({"CPU": 2, "GPU": 1}) == {"num_cpus": 2, "num_gpus": 1}
    assert ray_options({"TPU": 4, "memory": 1e9}) == {"num_cpus": 1, "num_gpus": 0, "memory": 1e9,
                                                      "resources": {"TPU": 4}}


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node on 127.0.0.1, one CPU each, dashboard off; always torn down."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a limit
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": temp}
    saved = {k: os.environ.get(k) for k in [*env, "XLA_FLAGS"]}
    os.environ.update(env)
    os.environ.pop("XLA_FLAGS", None)  # the nodes' workers (and so the arms) get one CPU device each
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cluster, started = Cluster(), []
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False,
                         temp_dir=os.path.join(temp, "ray"), _system_config={
                             "health_check_period_ms": 500, "health_check_failure_threshold": 4})
        worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        started += [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        yield cluster, worker
    finally:
        cluster.shutdown()
        started += [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        for p in started:  # what the cluster started and left behind (agents it re-parented)
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        shutil.rmtree(temp, ignore_errors=True)


def sweep_cmd(config: Path, workdir: Path, *flags: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "sweep.py"), f"--config={config}",
            f"--workdir={workdir}", *flags]


def checkpoint_steps(arm: Path) -> list[int]:
    ckpts = arm / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def arm_on_node(workdir: Path, node_id: str) -> Path | None:
    """An unfinished arm running on ``node_id`` that has saved a checkpoint."""
    for log in sorted(workdir.glob("arms/*/train.log")):
        headers = [line for line in log.read_text().splitlines() if line.startswith("== ")]
        arm = log.parent
        if (headers and f"Ray node {node_id}" in headers[-1] and checkpoint_steps(arm)
                and not (arm / "run_summary.json").exists()):
            return arm
    return None


def kill_node(node) -> None:
    """SIGKILL the node's raylet and everything under it (its workers and their arms)."""
    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    for p in raylet.children(recursive=True) + [raylet]:
        p.send_signal(signal.SIGKILL)


def comparable(report: str) -> list[str]:
    """report.md without what depends on the clock: the wall-time and first-step columns of the
    method table, the compile line and the plots."""
    out = []
    for line in report.splitlines():
        if not line.startswith(("Compile:", "![")):
            cells = line.split("|")
            out.append("|".join(cells[:6]) if len(cells) == 9 else line)
    return out


@pytest.fixture(scope="module")
def sweeps(cluster, tmp_path_factory):
    cluster, worker = cluster
    root = tmp_path_factory.mktemp("ray_sweep")
    config = root / "ray_config.py"
    config.write_text(CONFIG.format(repo=str(REPO), steps=STEPS, every=EVERY))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per arm
    local = subprocess.run(sweep_cmd(config, root / "local", "--parallel=2"), env=env,
                           capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]

    workdir, out = root / "ray", root / "ray.out"
    proc = subprocess.Popen(sweep_cmd(config, workdir, "--launcher=ray", f"--ray_address={cluster.address}"),
                            env=env, stdout=open(out, "w"), stderr=subprocess.STDOUT)
    try:
        deadline, victim = time.time() + 300, None
        while victim is None:
            assert time.time() < deadline and proc.poll() is None, out.read_text()[-3000:]
            victim = arm_on_node(workdir, worker.node_id)
            time.sleep(0.1)
        kill_node(worker)
        saved = checkpoint_steps(victim)[-1]
        cluster.remove_node(worker, allow_graceful=False)
        assert proc.wait(timeout=600) == 0, out.read_text()[-5000:]
    finally:
        proc.kill()
    return root, victim, saved, out.read_text()


def test_every_arm_finishes_and_the_lost_arm_resumes(sweeps):
    root, victim, saved, output = sweeps
    rows = list(csv.DictReader(open(root / "ray" / "results.csv")))
    assert [r["status"] for r in rows] == ["done"] * 4, output[-3000:]
    log = (victim / "train.log").read_text()
    assert log.count("\n== ") + log.startswith("== ") == 2  # the lost attempt and its retry
    assert f"resumed from {victim / 'checkpoints'} at step {saved}" in log
    summary = json.loads((victim / "run_summary.json").read_text())
    assert summary["resumed_from_step"] == saved > 0 and summary["steps"] == STEPS
    rows = [json.loads(line) for line in (victim / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(EVERY, STEPS + 1, EVERY))
    assert f"[{victim.name}] [train] step {STEPS}/{STEPS}" in output  # progress reached the driver


def test_report_equals_the_local_launchers(sweeps):
    root = sweeps[0]
    local = {r["name"]: r for r in csv.DictReader(open(root / "local" / "results.csv"))}
    remote = {r["name"]: r for r in csv.DictReader(open(root / "ray" / "results.csv"))}
    assert local.keys() == remote.keys()
    for name in local:
        for key in ("group", "seed", "status", "metric", "best_step", "trainable_params", "total_params"):
            assert remote[name][key] == local[name][key], (name, key)
        for key in ("value", "best_value"):
            assert float(remote[name][key]) == pytest.approx(float(local[name][key]), rel=1e-5)
    assert comparable((root / "ray" / "report.md").read_text()) == \
        comparable((root / "local" / "report.md").read_text())
