"""Sweeps: statistics against scipy, and the bookkeeping of a real (tiny) sweep."""

import csv
import json
import sys
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from ftjax.experiments import report, stats, sweep

REPO = Path(__file__).resolve().parents[1]


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
    with pytest.raises(ValueError, match="appears twice"):
        sweep.expand_arms([{"name": "a"}, {"name": "a"}])


SWEEP_CONFIG = '''
import sys
sys.path.insert(0, {repo!r})
from configs.tiny import get_config as tiny

def get_config(arg=None):
    c = tiny("steps=3")
    c.eval.max_batches = 1
    c.log.every_steps = 1
    c.checkpoint.async_save = False
    return c

def sweep():
    arms = [{{"name": f"lr{{lr}}-s{{s}}", "group": f"lr{{lr}}", "train.learning_rate": lr,
              "train.seed": s}} for lr in (0.003, 0.001) for s in (0, 1)]
    return arms + [{{"name": "broken", "group": "broken", "model.remat": "bogus"}}]
'''


def test_sweep_runs_resumes_and_reports(tmp_path):
    config = tmp_path / "sweep_config.py"
    config.write_text(SWEEP_CONFIG.format(repo=str(REPO)))
    workdir = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "scripts" / "sweep.py"), f"--config={config}", f"--workdir={workdir}"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[broken] FAILED" in first.stdout
    assert "unknown remat policy 'bogus'" in (workdir / "arms" / "broken" / "error.txt").read_text()

    rows = list(csv.DictReader(open(workdir / "results.csv")))
    assert [r["status"] for r in rows] == ["done"] * 4 + ["failed"]
    for r in rows[:4]:
        summary = json.loads((workdir / "arms" / r["name"] / "run_summary.json").read_text())
        assert float(r["value"]) == pytest.approx(summary["final"]["loss"])
        assert summary["tokens_seen"] == 3 * 16 * 64 and summary["train_flops"] > 0
    text = (workdir / "report.md").read_text()
    assert "| lr0.003 | 2 |" in text and "| lr0.001 | 2 |" in text and "Paired t-tests" in text
    assert "broken" in text and (workdir / "loss_by_method.png").exists()
    assert any((workdir / "xla_cache").iterdir())

    stamps = {p: p.stat().st_mtime for p in workdir.glob("arms/*/run_summary.json")}
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done, skipped") == 4 and "[broken] failed, skipped" in second.stdout
    assert stamps == {p: p.stat().st_mtime for p in workdir.glob("arms/*/run_summary.json")}
