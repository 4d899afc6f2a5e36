"""Real sweeps of the tiny config, end to end: the local launcher (results, report, a failed
arm, a rerun that skips what is finished), then the same arms on a two-node Ray cluster on
127.0.0.1 whose worker node is SIGKILLed mid-arm: Ray retries the arm on the head node, it
resumes from its checkpoint, and the report equals the local launcher's."""

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

from ftjax.experiments.ray_launcher import ray_options
import xla

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 40, 5

CONFIG = '''
import sys
sys.path.insert(0, {repo!r})
from ftjax.configs.tiny import get_config as tiny

RESOURCES = {{"CPU": 1}}

def get_config(arg=None):
    c = tiny("steps={steps}")
    c.data.seq_len, c.train.batch_size = 16, 2
    c.eval.max_batches, c.log.every_steps, c.log.tensorboard = 1, {every}, False
    c.checkpoint.every_steps, c.checkpoint.async_save = {every}, False
    return c

def sweep():
    arms = [{{"name": f"lr{{lr}}-s{{s}}", "group": f"lr{{lr}}", "train.learning_rate": lr,
              "train.seed": s}} for lr in (0.003, 0.001) for s in (0, 1)]
    return arms + [{{"name": "broken", "group": "broken", "model.remat": "bogus"}}]
'''
# Arms run on one CPU device (not conftest's 8 fake ones: fast steps on a shared machine), with
# the suite's fast-compile flags, as the Ray nodes' arms do (the cluster's XLA_FLAGS): the same
# programs, so the Ray sweep starts from a copy of the local sweep's XLA cache.
ARM_XLA_FLAGS = xla.flags()


def test_ray_options_split_resources():
    assert ray_options(None) == {"num_cpus": 1, "num_gpus": 0}
    assert ray_options({"CPU": 2, "GPU": 1}) == {"num_cpus": 2, "num_gpus": 1}
    assert ray_options({"TPU": 4, "memory": 1e9}) == {"num_cpus": 1, "num_gpus": 0, "memory": 1e9,
                                                      "resources": {"TPU": 4}}


@pytest.fixture(scope="module")
def cluster():
    """A head (2 CPUs) and a worker node (1 CPU) on 127.0.0.1, dashboard off; always torn down."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a limit
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": temp}
    saved = {k: os.environ.get(k) for k in [*env, "XLA_FLAGS"]}
    os.environ.update(env)
    os.environ["XLA_FLAGS"] = ARM_XLA_FLAGS  # the nodes' workers (and so the arms) get one CPU device each
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cluster, started = Cluster(), []
    try:
        cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", include_dashboard=False,
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
    from ray._private import ray_constants

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


def arm_env() -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS=ARM_XLA_FLAGS)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep_e2e") / "e2e_config.py"
    path.write_text(CONFIG.format(repo=str(REPO), steps=STEPS, every=EVERY))
    return path


@pytest.fixture(scope="module")
def local(config) -> tuple[Path, str]:
    """The local launcher's sweep (2 arms at a time): (workdir, its output)."""
    workdir = config.parent / "local"
    run = subprocess.run(sweep_cmd(config, workdir, "--parallel=2"), env=arm_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return workdir, run.stdout


def test_local_sweep_results_report_and_failed_arm(local):
    workdir, output = local
    assert "[broken] FAILED" in output
    error = (workdir / "arms" / "broken" / "error.txt").read_text()
    assert "error: config.model.remat='bogus'; choose from" in error
    rows = list(csv.DictReader(open(workdir / "results.csv")))
    assert [r["status"] for r in rows] == ["done"] * 4 + ["failed"]
    for r in rows[:4]:
        summary = json.loads((workdir / "arms" / r["name"] / "run_summary.json").read_text())
        assert float(r["value"]) == pytest.approx(summary["final"]["loss"])
        assert summary["tokens_seen"] == STEPS * 2 * 16 and summary["train_flops"] > 0
    text = (workdir / "report.md").read_text()
    assert "| lr0.003 | 2 |" in text and "| lr0.001 | 2 |" in text and "Paired t-tests" in text
    assert "broken" in text and (workdir / "loss_by_method.png").exists()
    assert any((workdir / "xla_cache").iterdir())


def test_local_rerun_skips_finished_and_failed_arms(local, config):
    workdir, _ = local
    stamps = {p: p.stat().st_mtime for p in workdir.glob("arms/*/run_summary.json")}
    again = subprocess.run(sweep_cmd(config, workdir), env=arm_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done, skipped") == 4 and "[broken] failed, skipped" in again.stdout
    assert stamps == {p: p.stat().st_mtime for p in workdir.glob("arms/*/run_summary.json")}


@pytest.fixture(scope="module")
def on_ray(cluster, config, local) -> tuple[Path, Path, int, str]:
    """The same sweep on Ray, its worker node killed mid-arm: (workdir, the lost arm, the
    checkpoint step it had saved, the driver's output)."""
    cluster, worker = cluster
    workdir, out = config.parent / "ray", config.parent / "ray.out"
    # The arms' programs are the local sweep's: its XLA cache spares each Ray arm the compile.
    shutil.copytree(local[0] / "xla_cache", workdir / "xla_cache")
    proc = subprocess.Popen(sweep_cmd(config, workdir, "--launcher=ray", f"--ray_address={cluster.address}"),
                            env=arm_env(), stdout=open(out, "w"), stderr=subprocess.STDOUT)
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
    return workdir, victim, saved, out.read_text()


def test_ray_every_arm_finishes_and_the_lost_arm_resumes(on_ray):
    workdir, victim, saved, output = on_ray
    rows = list(csv.DictReader(open(workdir / "results.csv")))
    assert [r["status"] for r in rows] == ["done"] * 4 + ["failed"], output[-3000:]
    log = (victim / "train.log").read_text()
    assert log.count("\n== ") + log.startswith("== ") == 2  # the lost attempt and its retry
    assert f"resumed from {victim / 'checkpoints'} at step {saved}" in log
    summary = json.loads((victim / "run_summary.json").read_text())
    assert summary["resumed_from_step"] == saved > 0 and summary["steps"] == STEPS
    logged = [json.loads(line) for line in (victim / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train/loss" in r] == list(range(EVERY, STEPS + 1, EVERY))
    assert f"[{victim.name}] [train] step {STEPS}/{STEPS}" in output  # progress reached the driver
    for row in rows:
        assert f"[{row['name']}] starting on" in output, row["name"]


def test_ray_report_equals_the_local_launchers(on_ray, local):
    (ray_dir, *_), (local_dir, _) = on_ray, local
    remote = {r["name"]: r for r in csv.DictReader(open(ray_dir / "results.csv"))}
    local = {r["name"]: r for r in csv.DictReader(open(local_dir / "results.csv"))}
    assert local.keys() == remote.keys()
    for name in local:
        for key in ("group", "seed", "status", "metric", "best_step", "trainable_params", "total_params"):
            assert remote[name][key] == local[name][key], (name, key)
        for key in ("value", "best_value"):
            if local[name][key]:
                assert float(remote[name][key]) == pytest.approx(float(local[name][key]), rel=1e-5)
    assert comparable((ray_dir / "report.md").read_text()) == \
        comparable((local_dir / "report.md").read_text())
