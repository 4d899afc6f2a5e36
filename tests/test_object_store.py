"""gs:// workdirs end to end against a real GCS emulator on 127.0.0.1 (tests/object_store.py).

Train on configs/tiny.py with the workdir in a bucket, kill -9 after the first checkpoint, resume
from the bucket and end bit-equal to an uninterrupted local run; evaluate and export (hf, to the
bucket) from the bucket; nothing lands in a local ``gs:`` folder; a workdir in a bucket that does
not exist fails before the first step with one line naming its URL.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from object_store import gcs, gcs_server  # noqa: F401  (fixtures)
import xla


REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "ftjax" / "configs" / "tiny.py"
STEPS = 8
# Batches of 4 x 32 tokens (tiny.py's 16 x 64 make each step of its 30k-vocabulary LM seconds long).
SMALL = ("--config.train.batch_size=4", "--config.data.seq_len=32", "--config.eval.max_batches=1")
ARGS = ("--config.log.every_steps=1", "--config.checkpoint.async_save=False",
        "--config.checkpoint.every_steps=2", f"--config.train.steps={STEPS}", *SMALL)


def _script(name: str, *args: str, env: dict, cwd: Path, wait: bool = True):
    env = dict(env, XLA_FLAGS=xla.flags(1), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(REPO / "scripts" / name), *args]
    if wait:
        return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _losses(text: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for line in text.splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out.setdefault(row["step"], []).append(row["train/loss"])
    return out


def _params(directory) -> dict:
    import jax
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(directory) as mgr:
        step = mgr.latest_step()
        state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(state["params"])}


def _scalar_steps(event_file: bytes, tag: str) -> set[int]:
    """Steps of the ``tag`` scalars in a TensorBoard event file (TFRecord framing: u64 length,
    u32 crc, the Event proto, u32 crc)."""
    import struct
    from tensorboardX.proto import event_pb2
    steps, pos = set(), 0
    while pos < len(event_file):
        (n,) = struct.unpack("<Q", event_file[pos:pos + 8])
        event = event_pb2.Event.FromString(event_file[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
        steps |= {event.step for v in event.summary.value if v.tag == tag}
    return steps


def _no_local_gs_folder(*dirs: Path) -> None:
    for d in dirs:
        assert not any(p.name.startswith("gs:") for p in d.rglob("*")), f"a local gs: folder in {d}"


def test_emulator_serves_epath_and_orbax(gcs):
    """The harness itself: epath and orbax (tensorstore) both read and write the bucket."""
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    assert gcs.bucket in gcs.buckets()
    p = epath.Path(gcs.url("x", "hello.txt"))
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("hi")
    assert p.read_text() == "hi" and [q.name for q in p.parent.iterdir()] == ["hello.txt"]
    tree = {"a": np.arange(4.0), "b": {"c": np.ones((2, 3), np.float32)}}
    with ocp.CheckpointManager(gcs.url("ckpt")) as mgr:
        mgr.save(1, args=ocp.args.StandardSave(tree))
        mgr.wait_until_finished()
    with ocp.CheckpointManager(gcs.url("ckpt")) as mgr:
        assert mgr.latest_step() == 1
        back = mgr.restore(1, args=ocp.args.StandardRestore(jax.tree.map(np.zeros_like, tree)))
    np.testing.assert_array_equal(back["b"]["c"], tree["b"]["c"])
    assert any(n.startswith("ckpt/1/") for n in gcs.objects("ckpt/"))  # really in the bucket

    # A conditional rewrite on the generation a read returned, as OCDBT's manifest does.
    import tensorstore as ts
    kv = ts.KvStore.open({"driver": "gcs", "bucket": gcs.bucket, "path": "kv/"}).result()
    kv.write("a", b"one").result()
    kv.write("a", b"two", if_equal=kv.read("a").result().stamp.generation).result()
    assert kv.read("a").result().value == b"two"


def test_data_cache_in_bucket(gcs, monkeypatch):
    """scripts/prepare_data.py's cache (prepare_cached) written to and read back from the bucket."""
    from ftjax.configs.tiny import get_config
    from ftjax.data import pipeline, prepare

    config = get_config()
    tokenizer = pipeline.load_tokenizer(config.data, "")
    cfg = next(iter(pipeline.task_configs(config.data).values()))
    fresh, directory = prepare.prepare_cached(cfg, tokenizer, gcs.url("cache"))
    assert str(directory) == gcs.url("cache", directory.name)
    assert f"cache/{directory.name}/labels.json" in gcs.objects("cache/")
    monkeypatch.setattr(prepare, "prepare", lambda *a, **k: pytest.fail("prepared again, cache missed"))
    cached, again = prepare.prepare_cached(cfg, tokenizer, gcs.url("cache"))
    assert again == directory
    assert fresh.examples.keys() == cached.examples.keys()
    for split in fresh.examples:
        assert [e.ids.tolist() for e in fresh.examples[split]] == [e.ids.tolist() for e in cached.examples[split]]


def test_gs_workdir_train_kill_resume_evaluate_export(gcs, tmp_path):
    from etils import epath

    cwd = tmp_path / "cwd"  # every script runs here: a pathlib slip would make ./gs:/...
    cwd.mkdir()
    local, remote = tmp_path / "local", gcs.url("run")
    config = f"--config={TINY}"

    # An uninterrupted local run (the reference) and, beside it, the same run in the bucket,
    # killed once it has logged a step past its first checkpoint (step 2) ...
    reference = _script("train.py", config, f"--workdir={local}", *ARGS, env=gcs.env, cwd=cwd, wait=False)
    proc = _script("train.py", config, f"--workdir={remote}", *ARGS, env=gcs.env, cwd=cwd, wait=False)
    metrics = epath.Path(remote) / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and max(_losses(metrics.read_text()) or [0]) >= 3):
        assert proc.poll() is None, f"training exited before the kill:\n{proc.stdout.read()}"
        assert time.time() < deadline, "step 3 not reached"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(n.startswith("run/checkpoints/2/") for n in gcs.objects("run/"))
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out[-3000:]

    # ... resumes from the bucket and ends where the local run did.
    r = _script("train.py", config, f"--workdir={remote}", *ARGS, env=gcs.env, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stdout + r.stderr
    a, b = _params(local / "checkpoints"), _params(f"{remote}/checkpoints")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bitwise on CPU
    want, got = _losses((local / "metrics.jsonl").read_text()), _losses(metrics.read_text())
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert {s: v[-1] for s, v in got.items()} == {s: v[-1] for s, v in want.items()}
    written = set(gcs.objects("run/"))
    for name in ("config.json", "run_summary.json", "eval/metrics.json"):
        assert f"run/{name}" in written, sorted(written)
    events = [n for n in written if n.startswith("run/tensorboard/") and "events." in n]
    logged = set().union(*(_scalar_steps(epath.Path(gcs.url(n)).read_bytes(), "train/loss") for n in events))
    assert logged == set(range(1, STEPS + 1)), (sorted(written), logged)

    # Evaluate and export from the bucket.
    (epath.Path(remote) / "eval" / "metrics.json").unlink()
    r = _script("evaluate.py", config, f"--workdir={remote}", *SMALL, env=gcs.env, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    evaluated = json.loads((epath.Path(remote) / "eval" / "metrics.json").read_text())
    assert evaluated["step"] == STEPS and np.isfinite(evaluated["loss"]), evaluated
    out = gcs.url("export", "hf")
    r = _script("export.py", f"--workdir={remote}", "--format=hf", f"--out={out}", env=gcs.env, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    exported = {n.rsplit("/", 1)[-1] for n in gcs.objects("export/hf/")}
    assert {"config.json", "model.safetensors", "README.md"} <= exported, exported
    import safetensors.numpy
    tensors = safetensors.numpy.load((epath.Path(out) / "model.safetensors").read_bytes())
    assert tensors and all(np.isfinite(t).all() for t in tensors.values())
    assert json.loads((epath.Path(out) / "config.json").read_text())["model_type"] == "llama"

    _no_local_gs_folder(cwd, tmp_path)
    assert not any(p.name.startswith("gs:") for p in REPO.iterdir())


def test_unwritable_gs_workdir_fails_before_the_first_step(gcs, tmp_path):
    url = "gs://no-such-bucket-ftjax/run"
    r = _script("train.py", f"--config={TINY}", f"--workdir={url}", *ARGS, env=gcs.env, cwd=tmp_path)
    assert r.returncode != 0
    assert "[train] step" not in r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if url in line]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "no-such-bucket-ftjax" not in gcs.buckets()  # and nothing made it on the way
    _no_local_gs_folder(tmp_path)


def test_gs_sweep_folder_holds_arms_results_and_report(gcs, tmp_path):
    """scripts/sweep.py with its folder in the bucket: the arm's workdir, its log (copied from the
    local spool when it ends), results.csv and report.md all land in the bucket."""
    from etils import epath

    config = tmp_path / "sweep_cfg.py"
    config.write_text(
        "from ftjax.configs.tiny import get_config as _tiny\n"
        "def get_config(arg=None):\n"
        "    c = _tiny()\n    c.train.steps = 2\n    c.eval.max_batches = 1\n"
        "    c.train.batch_size, c.data.seq_len = 4, 32\n"
        "    c.checkpoint.async_save = False\n    return c\n"
        "def sweep():\n    return [{'name': 'a', 'train.seed': 0}]\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = dict(gcs.env, PYTHONPATH=str(REPO))
    r = _script("sweep.py", f"--config={config}", f"--workdir={gcs.url('sweep')}", env=env, cwd=cwd)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    written = set(gcs.objects("sweep/"))
    for name in ("sweep.json", "results.csv", "report.md", "arms/a/run_summary.json",
                 "arms/a/train.log", "arms/a/config.json"):
        assert f"sweep/{name}" in written, sorted(written)
    assert any(n.startswith("sweep/arms/a/checkpoints/2/") for n in written)
    assert "[train] step 2/2" in (epath.Path(gcs.url("sweep", "arms", "a", "train.log"))).read_text()
    results = (epath.Path(gcs.url("sweep", "results.csv"))).read_text().splitlines()
    assert len(results) == 2 and results[1].startswith("a,"), results
    _no_local_gs_folder(cwd, tmp_path)
