"""Damaged checkpoints: resume falls back to the newest intact one; evaluate says what is wrong.

One uninterrupted run keeps checkpoints 2, 4, 6 and 8; copies of it get their newest ones damaged
in the three ways a crash or a full disk leaves them (a truncated data file, a missing
``_METADATA``, a missing ``manifest.ocdbt``).
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.test_train_loop import REPO, TINY, _flat, _params_at
import xla


STEPS, EVERY = 8, 2


def _config():
    from ftjax.configs.tiny import get_config

    c = get_config(f"steps={STEPS}")
    c.mesh.num_devices = 1
    c.checkpoint.every_steps = EVERY
    c.checkpoint.keep = 4
    c.checkpoint.async_save = False
    c.log.every_steps = 1
    c.eval.max_batches = 1
    return c


def _truncate_data_file(state):
    biggest = max((state / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    os.truncate(biggest, biggest.stat().st_size // 2)


# step -> (how it is damaged, what the message says is wrong)
DAMAGE = {
    8: (_truncate_data_file, "its data cannot be read: ValueError: OUT_OF_RANGE: Error reading"),
    6: (lambda state: (state / "_METADATA").unlink(), "state/_METADATA is missing"),
    4: (lambda state: (state / "manifest.ocdbt").unlink(), "state/manifest.ocdbt is missing"),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The uninterrupted run and its final parameters, read before any damage."""
    from ftjax.train.loop import train

    workdir = tmp_path_factory.mktemp("faults_ckpt") / "run"
    train(_config(), workdir)
    return workdir, _flat(_params_at(workdir, STEPS))


@pytest.fixture
def damaged(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished[0], workdir)
    for step, (damage, _) in DAMAGE.items():
        damage(workdir / "checkpoints" / str(step) / "state")
    return workdir


def test_damaged_checkpoints_are_set_aside_and_the_run_resumes_exactly(finished, damaged, capsys):
    from ftjax.train.loop import train

    train(_config(), damaged)
    lines = [l for l in capsys.readouterr().out.splitlines() if "is damaged" in l]
    assert len(lines) == len(DAMAGE), lines
    for line, step in zip(lines, sorted(DAMAGE, reverse=True)):
        moved = damaged / "checkpoints" / f"damaged-{step}"
        assert line.startswith(f"checkpoint step {step} is damaged ({DAMAGE[step][1]}"), line
        assert line.endswith(f"): moved it to {moved}; resuming from step {EVERY}, the newest "
                             "intact checkpoint"), line
        assert (moved / "state").is_dir()  # kept aside, not deleted
    want, got = finished[1], _flat(_params_at(damaged, STEPS))  # step 8 saved again beside damaged-8
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_evaluate_on_a_damaged_checkpoint_is_one_clear_line(damaged):
    from ftjax.train.checkpoint import RunCheckpointError
    from ftjax.train.loop import load_trained

    with pytest.raises(RunCheckpointError) as e:
        load_trained(_config(), damaged, "6")
    assert str(e.value) == (f"checkpoint step 6 in {damaged / 'checkpoints'} is damaged: "
                            f"state/_METADATA is missing; use another checkpoint ([2, 4, 8]) or a "
                            "new workdir")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), f"--config={TINY}",
                        f"--workdir={damaged}", "--checkpoint=8", "--config.mesh.num_devices=1",
                        "--config.eval.max_batches=1"],
                       env=dict(os.environ, XLA_FLAGS=xla.flags(1)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith(f"error: checkpoint step 8 in {damaged / 'checkpoints'} is damaged: "
                               f"{DAMAGE[8][1]}"), r.stderr[-3000:]
    assert r.stderr.count("\n") == 1, r.stderr[-3000:]  # one line, no traceback
