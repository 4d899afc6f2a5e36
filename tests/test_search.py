"""Search: the spec, the driver (parallel trials, SIGTERM) on fake runs, and a real tiny 4-trial
search that prunes, is killed, resumes and reports."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import ml_collections
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from ftjax.experiments import launchers, search
from ftjax.experiments.sweep import SweepInterrupted
import xla

REPO = Path(__file__).resolve().parents[1]


def _spec(**entry):
    return search.spec_from({"space": {"train.learning_rate": ("loguniform", 1e-5, 1e-2)}, "trials": 3,
                             **entry}, default_metric="loss", default_mode="min")


def test_spec_defaults_and_errors(tmp_path):
    spec = _spec()
    assert (spec.metric, spec.mode, spec.direction, spec.pruner) == ("loss", "min", "minimize", {"kind": "median"})
    assert _spec(metric="accuracy", mode="max").direction == "maximize"
    for bad, match in [({"space": {}}, "non-empty 'space'"),
                       ({"space": {"train.learning_rate": ("log", 1e-5, 1e-2)}}, "'train.learning_rate'"),
                       ({"space": {"train.seed": ("int", 3, 1)}}, "'train.seed'"),
                       ({"space": {"method.kind": ("choice", [])}}, "'method.kind'"),
                       ({"trials": 0}, "'trials' >= 1"),
                       ({"pruner": {"kind": "hyperband"}}, "pruner kind 'hyperband'"),
                       ({"mode": "best"}, "mode 'best'"),
                       ({"trails": 6}, "unknown keys")]:
        with pytest.raises(search.SearchError, match=match):
            _spec(**bad)
    with pytest.raises(search.SearchError, match="MedianPruner says: .*'n_startup'"):
        search.open_study(tmp_path, _spec(pruner={"kind": "median", "n_startup": 2}))
    with pytest.raises(search.SearchError, match="set 'storage' in search"):
        search.open_study("gs://bucket/search", spec)


def test_load_spec_takes_the_objective_from_the_config_and_needs_evals_to_prune():
    module = types.SimpleNamespace(search=lambda: {"space": {"train.seed": ("int", 0, 3)}, "trials": 2})
    config = ml_collections.ConfigDict({"eval": {"best_metric": "accuracy", "best_mode": "max",
                                                 "every_steps": 0}})
    with pytest.raises(search.SearchError, match="eval.every_steps"):
        search.load_spec(module, None, config)
    config.eval.every_steps = 10
    spec = search.load_spec(module, None, config)
    assert (spec.metric, spec.direction) == ("accuracy", "maximize")


def test_suggest_uses_the_named_distributions():
    space = {"train.learning_rate": ("loguniform", 1e-5, 1e-2), "train.weight_decay": ("uniform", 0.0, 0.1),
             "method.lora.rank": ("choice", [4, 8, 16]), "train.warmup_steps": ("int", 0, 20)}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        params = search.suggest(trial, space)
        study.tell(trial, 0.0)
    stored = study.trials[-1]
    assert stored.params == params  # optuna's own record of the sampled values
    assert stored.distributions == {
        "train.learning_rate": FloatDistribution(1e-5, 1e-2, log=True),
        "train.weight_decay": FloatDistribution(0.0, 0.1),
        "method.lora.rank": CategoricalDistribution([4, 8, 16]),
        "train.warmup_steps": IntDistribution(0, 20)}
    lrs = [t.params["train.learning_rate"] for t in study.trials]
    assert all(1e-5 <= x <= 1e-2 for x in lrs) and min(lrs) < 1e-4  # log-uniform reaches the low decades


class _FakeTraining(launchers.Launcher):
    """A launcher whose arms train nothing: each writes the files a run writes (config.json, eval
    rows in metrics.jsonl, run_summary.json) for a loss that is worse the further the learning
    rate is from 1e-3, a step every 40 ms, and stops at a step boundary when asked."""

    def __init__(self, workdir, *, parallel=2, interrupt_at=None):
        super().__init__("unused.py", workdir, echo=lambda message: None)
        self.concurrency, self.interrupt_at = parallel, interrupt_at
        self.started, self.active, self.max_active = [], 0, 0
        self._lock = threading.Lock()

    def run_arm(self, arm):
        stop = self._stop_flag(arm)
        with self._lock:
            self.started.append(arm.name)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        if arm.name == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill DRIVER`: the driver's handler runs
        try:
            return self._train(arm, stop)
        finally:
            with self._lock:
                self.active -= 1

    def _train(self, arm, stop):
        run = Path(self.workdir) / "arms" / arm.name
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps({"train": {"steps": 12}}))
        far = abs(math.log10(arm.overrides["train.learning_rate"]) + 3)
        rows, best, step = [], None, 0
        while step < 12 and not stop():
            step += 1
            time.sleep(0.04)
            if step % 3 == 0:
                rows.append({"step": step, "eval/loss": far + 6 / step})
                (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                if best is None or rows[-1]["eval/loss"] < best["value"]:
                    best = {"step": step, "metric": "loss", "value": rows[-1]["eval/loss"]}
        (run / "run_summary.json").write_text(json.dumps({"steps": step, "best": best}))
        return "done" if step == 12 else "interrupted"


def test_driver_runs_trials_in_parallel_and_a_sigterm_leaves_them_to_resume(tmp_path):
    spec = search.spec_from({"space": {"train.learning_rate": ("loguniform", 1e-6, 1.0)}, "trials": 6,
                             "pruner": {"kind": "median", "n_startup_trials": 2}},
                            default_metric="loss", default_mode="min")
    first = _FakeTraining(tmp_path, interrupt_at="trial-003")
    with pytest.raises(SweepInterrupted, match="trial-00"):
        search.SearchDriver(first, tmp_path, spec, parallel=2, echo=lambda m: None, poll_s=0.005).run()
    assert first.max_active == 2 and first.started == [f"trial-00{i}" for i in range(4)]
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    left = [t.number for t in optuna.load_study(study_name="search", storage=storage).trials
            if t.state == TrialState.RUNNING]
    assert 3 in left and len(left) <= 2  # stopped, not failed: left for the next run

    second = _FakeTraining(tmp_path)
    search.SearchDriver(second, tmp_path, spec, parallel=2, echo=lambda m: None, poll_s=0.005).run()
    assert second.started[:len(left)] == [f"trial-{n:03d}" for n in left]  # continued first
    assert all(f"trial-00{i}" not in second.started for i in range(3) if i not in left)
    trials = optuna.load_study(study_name="search", storage=storage).trials
    assert len(trials) == 6 and second.max_active <= 2
    for t in trials:
        summary = json.loads((tmp_path / "arms" / t.user_attrs["arm"] / "run_summary.json").read_text())
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        assert t.user_attrs["stopped_at_step"] == summary["steps"]
        if t.state == TrialState.COMPLETE:
            assert summary["steps"] == 12 and t.value == summary["best"]["value"]
        else:
            assert summary["steps"] < 12


SEARCH_CONFIG = '''
import sys
sys.path.insert(0, {repo!r})
from ftjax.configs.tiny import get_config as tiny

def get_config(arg=None):
    c = tiny("steps=12")
    c.data.max_examples = 256
    c.data.seq_len = 32
    c.train.batch_size = 4
    c.train.warmup_steps = 2
    c.eval.every_steps = 3
    c.eval.max_batches = 1
    c.eval.batch_size = 8
    c.log.every_steps = 3
    c.log.tensorboard = False
    c.checkpoint.async_save = False
    return c

def search():
    return dict(space={{"train.learning_rate": ("loguniform", 1e-5, 3e-2),
                        "train.weight_decay": ("uniform", 0.0, 0.1)}},
                trials={trials}, pruner={{"kind": "median", "n_startup_trials": 2, "n_warmup_steps": 3}})
'''


# Two the pruner never judges (n_startup_trials), two it may prune: each trial is a train process.
TRIALS = 4


def _starting(text: str) -> list[str]:
    return sorted(line.split("]")[0][1:] for line in text.splitlines() if "] starting on" in line)


def test_search_prunes_resumes_after_kill_and_reports(tmp_path):
    config = tmp_path / "search_config.py"
    config.write_text(SEARCH_CONFIG.format(repo=str(REPO), trials=TRIALS))
    workdir = tmp_path / "search"
    cmd = [sys.executable, str(REPO / "scripts" / "sweep.py"),
           f"--config={config}", f"--workdir={workdir}", "--search"]
    env = dict(os.environ, XLA_FLAGS=xla.flags())  # one CPU device per trial

    # First run: killed (SIGKILL, no chance to clean up) while trial 1, which the pruner never
    # judges (n_startup_trials=2), is training; its process gets SIGTERM and checkpoints.
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen, deadline = [], time.time() + 400
    for line in first.stdout:
        seen.append(line)
        if line.startswith("[trial-001] first step") or time.time() > deadline:
            first.kill()
            break
    first.wait()
    first_out = "".join(seen)
    assert "[trial-001] first step" in first_out, first_out[-3000:]
    arms = workdir / "arms"
    finished_before = (arms / "trial-000" / "run_summary.json").stat().st_mtime_ns

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "continuing trial(s) 1" in second.stdout
    # The finished trial was read back, not run again; the one killed mid-run went on from its
    # checkpoint.
    assert _starting(first_out) == ["trial-000", "trial-001"]
    assert _starting(second.stdout) == [f"trial-{n:03d}" for n in range(1, TRIALS)]
    assert (arms / "trial-000" / "run_summary.json").stat().st_mtime_ns == finished_before
    assert "resumed from" in (arms / "trial-001" / "train.log").read_text()

    # The study optuna stored, read back independently of the driver.
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{workdir / 'study.db'}")
    trials = study.trials
    assert len(trials) == TRIALS
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "no trial was pruned"
    for t in trials:
        summary = json.loads((arms / t.user_attrs["arm"] / "run_summary.json").read_text())
        evals = {r["step"]: r["eval/loss"] for r in map(json.loads, (arms / t.user_attrs["arm"] / "metrics.jsonl")
                                                        .read_text().splitlines()) if "eval/loss" in r}
        if t.state == TrialState.PRUNED:  # every eval up to the pruning one, reported at its step
            assert t.intermediate_values == {s: v for s, v in evals.items() if s <= t.last_step}
            assert 3 <= t.last_step <= summary["steps"] < 12  # stopped soon after the pruning eval
        else:
            assert t.intermediate_values == evals
            assert summary["steps"] == 12 and t.value == summary["best"]["value"]
    best = study.best_trial
    best_summary = json.loads((arms / best.user_attrs["arm"] / "run_summary.json").read_text())
    assert best.value == best_summary["best"]["value"]
    complete = [json.loads((arms / t.user_attrs["arm"] / "run_summary.json").read_text())["best"]["value"]
                for t in trials if t.state == TrialState.COMPLETE]
    assert best.value == min(complete)

    # The report: every trial, pruned ones with their step, the best configuration, importances.
    rows = list(csv.DictReader(open(workdir / "trials.csv")))
    assert [int(r["number"]) for r in rows] == list(range(TRIALS))
    assert {int(r["number"]): int(r["pruned_at_step"]) for r in rows if r["state"] == "pruned"} == {
        t.number: t.last_step for t in pruned}
    report = (workdir / "search_report.md").read_text()
    assert f"Best: trial {best.number} (`arms/{best.user_attrs['arm']}`)" in report
    assert f"--config.train.learning_rate={best.params['train.learning_rate']}" in report
    assert sum(line.startswith(f"| {t.number} | ") for t in trials for line in report.splitlines()) == TRIALS
    assert (workdir / "param_importance.png").stat().st_size > 1000
    assert (workdir / "intermediate_values.png").stat().st_size > 1000
