"""Search: the spec, and a real (tiny) 6-trial search that prunes, is killed, resumes and reports."""

import csv
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import ml_collections
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from ftjax.experiments import search

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


SEARCH_CONFIG = '''
import sys
sys.path.insert(0, {repo!r})
from configs.tiny import get_config as tiny

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
                trials=6, pruner={{"kind": "median", "n_startup_trials": 2, "n_warmup_steps": 3}})
'''


def _starting(text: str) -> list[str]:
    return sorted(line.split("]")[0][1:] for line in text.splitlines() if "] starting on" in line)


def test_search_prunes_resumes_after_kill_and_reports(tmp_path):
    config = tmp_path / "search_config.py"
    config.write_text(SEARCH_CONFIG.format(repo=str(REPO)))
    workdir = tmp_path / "search"
    cmd = [sys.executable, str(REPO / "scripts" / "sweep.py"),
           f"--config={config}", f"--workdir={workdir}", "--search"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per trial

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
    assert _starting(second.stdout) == ["trial-001", "trial-002", "trial-003", "trial-004", "trial-005"]
    assert (arms / "trial-000" / "run_summary.json").stat().st_mtime_ns == finished_before
    assert "resumed from" in (arms / "trial-001" / "train.log").read_text()

    # The study optuna stored, read back independently of the driver.
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{workdir / 'study.db'}")
    trials = study.trials
    assert len(trials) == 6
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
    assert [int(r["number"]) for r in rows] == list(range(6))
    assert {int(r["number"]): int(r["pruned_at_step"]) for r in rows if r["state"] == "pruned"} == {
        t.number: t.last_step for t in pruned}
    report = (workdir / "search_report.md").read_text()
    assert f"Best: trial {best.number} (`arms/{best.user_attrs['arm']}`)" in report
    assert f"--config.train.learning_rate={best.params['train.learning_rate']}" in report
    assert sum(line.startswith(f"| {t.number} | ") for t in trials for line in report.splitlines()) == 6
    assert (workdir / "param_importance.png").stat().st_size > 1000
    assert (workdir / "intermediate_values.png").stat().st_size > 1000
