"""Logs after kill -9 and resume: each step logged once, with the uninterrupted run's values.

A run killed before its first checkpoint is run again from scratch, killed again between two
checkpoints, then resumed to the end. Its metrics.jsonl, its TensorBoard events and the sweep
report's learning-curve data must equal the uninterrupted run's; the rows the killed runs logged
beyond their last checkpoint are kept aside in ``metrics.jsonl.stale-<run>``.
"""

import json
import signal
import struct

import numpy as np
import pytest

from tests.test_train_loop import _run_cli, _wait_for_step

STEPS, EVERY = 9, 3
BATCH, SEQ = 4, 32  # tiny.py's 16 x 64 tokens make each step of its 30k-vocabulary LM seconds long
ARGS = ("--config.log.every_steps=1", f"--config.train.steps={STEPS}", "--config.mesh.num_devices=1",
        "--config.eval.max_batches=1", f"--config.train.batch_size={BATCH}", f"--config.data.seq_len={SEQ}")
VALUES = ("train/loss", "train/accuracy", "train/grad_norm", "train/learning_rate", "eval/loss")


@pytest.fixture(scope="module", autouse=True)
def shared_xla_cache(tmp_path_factory):
    """The training processes these tests start and kill compile the same programs: one
    persistent XLA cache (per session) lets the later ones skip the compile."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "xla_cache"))
        yield


def reference_run(tmp_path_factory):
    """An uninterrupted in-process run of this config (checkpoints every 3 steps); made once per
    session and shared by the kill tests of several modules."""
    from ftjax.configs.tiny import get_config
    from ftjax.train.loop import train

    workdir = tmp_path_factory.getbasetemp() / "uninterrupted_tiny"
    if not (workdir / "run_summary.json").exists():
        config = get_config()
        config.update_from_flattened_dict({a[len("--config."):].split("=")[0]: int(a.split("=")[1])
                                           for a in ARGS})
        config.checkpoint.every_steps = EVERY
        train(config, workdir)
    return workdir


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def _values(rows: list[dict]) -> dict[tuple[int, str], float]:
    """(step, key) -> value of the compared keys; a (step, key) seen twice fails."""
    out = {}
    for row in rows:
        for key in VALUES:
            if key in row:
                assert (row["step"], key) not in out, f"step {row['step']} {key} logged twice"
                out[row["step"], key] = row[key]
    return out


def _checkpoints(workdir) -> list[int]:
    ckpts = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def _kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _scalar_events(tb_dir) -> dict[tuple[int, str], list[float]]:
    """What TensorBoard shows: every event file's scalars, in file order, each file's purge event
    (a SessionLog START at step s) hiding the earlier files' events at steps >= s."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    shown: dict[tuple[int, str], list[float]] = {}
    for path in sorted(tb_dir.iterdir()):
        data, at = path.read_bytes(), 0
        while at + 12 <= len(data):  # TFRecord: length, crc, payload, crc
            (length,) = struct.unpack("<Q", data[at:at + 8])
            if at + 16 + length > len(data):
                break  # a record cut short by the kill
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 16 + length
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                shown = {k: v for k, v in shown.items() if k[0] < event.step}
            for value in event.summary.value:
                shown.setdefault((event.step, value.tag), []).append(value.simple_value)
    return shown


@pytest.fixture(scope="module")
def killed_twice(tmp_path_factory):
    """The workdir after: killed before its first checkpoint, rerun and killed between two
    checkpoints, resumed to the end; with the logs each killed run left."""
    workdir = tmp_path_factory.mktemp("resume_logs") / "run"
    # No checkpoint before the end: the kill certainly comes before the first one.
    proc = _run_cli(workdir, *ARGS, "--config.checkpoint.every_steps=100", wait=False)
    _wait_for_step(workdir, 2, proc)
    _kill(proc)
    assert _checkpoints(workdir) == []
    first = (workdir / "metrics.jsonl").read_text()
    proc = _run_cli(workdir, *ARGS, f"--config.checkpoint.every_steps={EVERY}", wait=False)
    _wait_for_step(workdir, EVERY + 2, proc)
    _kill(proc)
    second, restored = (workdir / "metrics.jsonl").read_text(), max(_checkpoints(workdir))
    r = _run_cli(workdir, *ARGS, f"--config.checkpoint.every_steps={EVERY}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'} at step {restored}" in r.stdout
    return workdir, first, second, restored


def test_each_step_is_logged_once_with_the_uninterrupted_values(tmp_path_factory, killed_twice):
    workdir, _, second, restored = killed_twice
    want = _values(_rows((reference_run(tmp_path_factory) / "metrics.jsonl").read_text()))
    rows = _rows((workdir / "metrics.jsonl").read_text())
    assert _values(rows) == want
    # Rows up to the checkpoint are the second run's, the rest the third's; the summary says so.
    runs = [r["run"] for r in rows]
    second_run = _rows(second)[0]["run"]
    assert runs == [second_run] * restored + [runs[-1]] * (len(rows) - restored)
    assert runs[-1] != second_run
    summary = json.loads((workdir / "run_summary.json").read_text())
    assert summary["run"] == runs[-1] and summary["resumed_from_step"] == restored
    # Totals cover steps 1..STEPS (packed LM rows: BATCH x SEQ tokens a step), not only the last
    # process's steps.
    assert summary["tokens_seen"] == STEPS * BATCH * SEQ
    assert summary["this_process"]["tokens_seen"] == (STEPS - restored) * BATCH * SEQ
    assert summary["wall_time_s"] > summary["this_process"]["wall_time_s"] > 0
    uninterrupted = json.loads((reference_run(tmp_path_factory) / "run_summary.json").read_text())
    assert summary["train_flops"] == uninterrupted["train_flops"] > 0


def test_rows_beyond_the_restored_step_are_kept_aside(killed_twice):
    workdir, first, second, restored = killed_twice
    stale = sorted(workdir.glob("metrics.jsonl.stale-*"))
    assert len(stale) == 2
    assert stale[0].read_text() == first  # the run that died before its first checkpoint
    beyond = [line for line in second.splitlines() if json.loads(line)["step"] > restored]
    assert beyond and stale[1].read_text().splitlines() == beyond


def test_learning_curves_and_tensorboard_show_one_run(tmp_path_factory, killed_twice):
    from ftjax.experiments.report import learning_curve

    workdir = killed_twice[0]
    reference = _rows((reference_run(tmp_path_factory) / "metrics.jsonl").read_text())
    want = [(r["step"], r["train/loss"]) for r in reference if "train/loss" in r]
    assert learning_curve(workdir) == want
    shown = _scalar_events(workdir / "tensorboard")
    assert sorted(s for s, tag in shown if tag == "train/loss") == list(range(1, STEPS + 1))
    for step, loss in want:
        assert shown[step, "train/loss"] == [np.float32(loss)], step
