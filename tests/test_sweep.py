"""Sweeps: statistics against scipy, arm bookkeeping, and the devices a local arm gets.

Real sweeps run in tests/test_sweep_ray.py (local and Ray launchers) and
tests/test_sweep_faults.py (SIGTERM / SIGKILL of the sweep)."""

import threading
import time

import numpy as np
import pytest
from scipy import stats as scipy_stats

from ftjax.experiments import launchers, stats, sweep


def test_summary_and_bootstrap_against_scipy():
    x = np.array([0.81, 0.84, 0.79, 0.86, 0.83, 0.80, 0.85, 0.82])
    s = stats.summarize(x)
    assert s.mean == pytest.approx(np.mean(x))
    assert s.std == pytest.approx(np.sqrt(np.sum((x - x.mean()) ** 2) / (len(x) - 1)))
    ref = scipy_stats.bootstrap((x,), np.mean, confidence_level=0.95, method="percentile",
                                n_resamples=20_000, random_state=1).confidence_interval
    assert s.ci_low == pytest.approx(ref.low, abs=0.003)
    assert s.ci_high == pytest.approx(ref.high, abs=0.003)
    assert stats.summarize([0.5]).std == 0.0


def test_paired_t_test_against_scipy():
    a, b = [0.85, 0.87, 0.84, 0.88], [0.82, 0.86, 0.80, 0.85]
    mine, ref = stats.paired_t_test(a, b), scipy_stats.ttest_rel(a, b)
    assert mine.t == pytest.approx(ref.statistic)
    assert mine.p_value == pytest.approx(ref.pvalue)
    assert mine.mean_diff == pytest.approx(np.mean(np.subtract(a, b)))
    assert np.isnan(stats.paired_t_test([1.0], [0.5]).p_value)


def test_arm_names_and_groups():
    arms = sweep.expand_arms([{"train.learning_rate": 0.1, "train.seed": 0},
                              {"train.learning_rate": 0.1, "train.seed": 1},
                              {"name": "x", "group": "g", "method.kind": "full"}])
    assert arms[0].group == arms[1].group == "learning_rate=0.1"
    assert arms[0].name != arms[1].name and arms[1].seed == 1
    assert (arms[2].name, arms[2].group) == ("x", "g")
    with pytest.raises(sweep.SweepError, match="appears twice"):
        sweep.expand_arms([{"name": "a"}, {"name": "a"}])
    default, own = sweep.expand_arms([{"name": "a"}, {"name": "b", "resources": {"GPU": 1}}],
                                     resources={"TPU": 4})
    assert (default.resources, own.resources) == ({"TPU": 4}, {"GPU": 1})
    assert "resources" not in own.overrides and own.group == "default"


def test_device_env_gives_each_slot_its_own_devices():
    assert launchers.device_env(0, 0, {}) == {}
    env = launchers.device_env(1, 2, {})
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["TPU_VISIBLE_CHIPS"] == "2,3"
    assert env["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,2,1" and env["TPU_PROCESS_BOUNDS"] == "1,1,1"
    ports = {launchers.device_env(s, 1, {})["TPU_MESH_CONTROLLER_PORT"] for s in range(4)}
    assert len(ports) == 4
    # A CUDA_VISIBLE_DEVICES already set is the pool the slots split.
    assert launchers.device_env(1, 2, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})["CUDA_VISIBLE_DEVICES"] == "6,7"
    with pytest.raises(sweep.SweepError, match="CUDA_VISIBLE_DEVICES=4,5"):
        launchers.device_env(1, 2, {"CUDA_VISIBLE_DEVICES": "4,5"})
    assert "TPU_VISIBLE_CHIPS" not in launchers.device_env(0, 3, {})  # GPUs split in 3s; TPUs do not


def test_local_parallel_arms_get_disjoint_devices(tmp_path, monkeypatch):
    seen, running, lock = [], set(), threading.Lock()

    def fake_run_arm(config_arg, arm, workdir, *, env, **kwargs):
        mine = env["CUDA_VISIBLE_DEVICES"]
        with lock:
            assert mine not in running, "two running arms share devices"
            running.add(mine)
            seen.append(mine)
        time.sleep(0.05)
        with lock:
            running.remove(mine)
        return "done"

    monkeypatch.setattr(sweep, "run_arm", fake_run_arm)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    arms = sweep.expand_arms([{"name": f"a{i}"} for i in range(6)])
    out = launchers.LocalLauncher("cfg.py", tmp_path, parallel=2, devices_per_arm=2).run(arms)
    assert out == {a.name: "done" for a in arms}
    assert sorted(set(seen)) == ["0,1", "2,3"] and len(seen) == 6


def test_a_stopped_sweep_starts_no_more_arms(tmp_path, monkeypatch):
    arm = sweep.expand_arms([{"name": "never"}])[0]
    assert sweep.run_arm("cfg.py", arm, tmp_path, stop=lambda: True) == "pending"
    assert not (tmp_path / "arms" / "never").exists()  # no process, no log

    launcher = launchers.LocalLauncher("cfg.py", tmp_path, parallel=1)
    real_run_arm = sweep.run_arm

    def fake_run_arm(config_arg, arm, workdir, *, stop, **kwargs):
        if arm.name == "first":  # SIGTERM to the sweep while its first arm runs
            launcher.stop_all()
            return "interrupted"
        return real_run_arm(config_arg, arm, workdir, stop=stop, **kwargs)

    monkeypatch.setattr(sweep, "run_arm", fake_run_arm)
    with pytest.raises(sweep.SweepInterrupted, match=r"arm\(s\) first stopped .*, 1 not started") as e:
        launcher.run(sweep.expand_arms([{"name": "first"}, {"name": "second"}]))
    assert e.value.statuses == {"first": "interrupted", "second": "pending"}
    assert not (tmp_path / "arms" / "second").exists()
