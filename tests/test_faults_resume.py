"""Resuming: a config that changes what the checkpoints hold is refused before anything is
written; harmless changes are recorded; kill -9 at random moments still resumes exactly."""

import json
import random
import shutil
import time

import numpy as np
import pytest

from tests.test_resume_logs import (ARGS, BATCH, EVERY, SEQ, STEPS, _checkpoints, _kill,  # noqa: F401
                                    _values, reference_run, shared_xla_cache)
from tests.test_train_loop import _flat, _params_at, _run_cli, _wait_for_step

BASE = {"train.steps": 20, "checkpoint.every_steps": 10, "log.every_steps": 10,
        "mesh.num_devices": 1, "eval.max_batches": 1, "train.batch_size": BATCH, "data.seq_len": SEQ}


def _config(**overrides):
    from ftjax.configs.tiny import get_config

    config = get_config()
    config.update_from_flattened_dict({**BASE, **overrides})
    return config


def _files(workdir) -> dict[str, bytes]:
    return {str(p.relative_to(workdir)): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from ftjax.train.loop import train

    workdir = tmp_path_factory.mktemp("resume_full") / "run"
    train(_config(), workdir)
    return workdir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from ftjax.train.loop import train

    workdir = tmp_path_factory.mktemp("resume_lora") / "run"
    train(_config(**{"method.kind": "lora", "train.steps": 2, "checkpoint.every_steps": 2}), workdir)
    return workdir


def test_full_to_lora_is_refused_naming_the_key_and_both_values(full_run):
    before = _files(full_run)
    r = _run_cli(full_run, *(f"--config.{k}={v}" for k, v in BASE.items()), "--config.method.kind=lora",
                 devices=1)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr == (
        f"error: cannot resume {full_run} with this config: method.kind: 'full' in config.json, "
        f"'lora' now — these change what its checkpoints hold or what their data position means; "
        f"train in a new workdir (with --config.model.init_from={full_run} to start from this "
        f"run's weights) or set the keys back\n")
    assert _files(full_run) == before  # config.json (and everything else) untouched


def test_lora_rank_8_to_4_is_refused(lora_run):
    from ftjax.train.loop import train
    from ftjax.train.resume import ResumeConfigError

    before = _files(lora_run)
    config = _config(**{"method.kind": "lora", "train.steps": 2, "checkpoint.every_steps": 2,
                        "method.lora.rank": 4})
    with pytest.raises(ResumeConfigError, match=r"method\.lora\.rank: 8 in config\.json, 4 now —"):
        train(config, lora_run)
    assert _files(lora_run) == before


def test_more_steps_are_allowed_recorded_and_the_run_continues(full_run, tmp_path):
    from ftjax.train.loop import train

    workdir = tmp_path / "run"
    shutil.copytree(full_run, workdir)
    # best_mode=max over the loss makes the best eval the one before the resume (step 20): the
    # resumed run's summary must still name it, from the eval rows its log kept.
    train(_config(**{"train.steps": 30, "eval.best_mode": "max"}), workdir)
    history = [json.loads(line) for line in (workdir / "config_history.jsonl").read_text().splitlines()]
    assert len(history) == 1
    assert history[0]["step"] == 20
    assert history[0]["changed"] == {"train.steps": {"old": 20, "new": 30},
                                     "eval.best_mode": {"old": "min", "new": "max"}}
    evals = {r["step"]: r["eval/loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text()
                                                    .splitlines()) if "eval/loss" in r}
    assert sorted(evals) == [20, 30] and evals[20] > evals[30], evals
    best = json.loads((workdir / "run_summary.json").read_text())["best"]
    assert (best["step"], best["value"]) == (20, evals[20]), best
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 30
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [10, 20, 30]
    assert _checkpoints(workdir)[-1] == 30


def _kill_during_async_save(workdir, proc) -> None:
    """Kill as soon as a checkpoint folder that was not there appears (orbax's temporary one)."""
    ckpts = workdir / "checkpoints"
    seen = {p.name for p in ckpts.iterdir()} if ckpts.exists() else set()
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and {p.name for p in ckpts.iterdir()} - seen:
            break
        time.sleep(0.005)
    _kill(proc)


def test_kill_9_at_random_moments_resumes_exactly(tmp_path_factory, tmp_path):
    reference = reference_run(tmp_path_factory)
    workdir, rng = tmp_path / "run", random.Random(20261201)
    args = (*ARGS, f"--config.checkpoint.every_steps={EVERY}")
    # A run killed at a random step, then the next one (resumed from its last checkpoint, if it
    # had one) killed while an async save is under way: each start is a train process.
    for trial in range(2):
        proc = _run_cli(workdir, *args, wait=False)
        if trial == 1:
            _kill_during_async_save(workdir, proc)
        else:
            _wait_for_step(workdir, rng.randint(1, STEPS - 1), proc)
            time.sleep(rng.uniform(0.0, 0.5))
            _kill(proc)
    r = _run_cli(workdir, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = _flat(_params_at(reference, STEPS)), _flat(_params_at(workdir, STEPS))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)  # bitwise on CPU
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert _values(rows) == _values([json.loads(line) for line in
                                     (reference / "metrics.jsonl").read_text().splitlines()])


def test_a_url_workdir_stays_a_url_and_an_unwritable_one_fails_before_the_build(tmp_path):
    from ftjax.paths import WorkdirError, as_path
    from ftjax.train.loop import train

    assert str(as_path("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(WorkdirError) as e:
        train(_config(), blocker / "run")
    assert str(e.value).startswith(f"cannot write to the workdir {blocker / 'run'}: ")
    assert "\n" not in str(e.value) and "another --workdir" in str(e.value)
