"""Data scaling: the fit against scipy/numpy, nested train subsets, the report end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from data_util import bert_tokenizer, data_cfg, write
from ftjax.data import prepare, sources
from ftjax.data.records import DataError
from ftjax.experiments import scaling

REPO = Path(__file__).resolve().parents[1]
SIZES = [2 ** k for k in range(6, 13)]  # 64 ... 4096, like 1/64 ... 1/1 of a train split


def _runs(f, seeds=3, noise=0.004, seed=0):
    rng = np.random.default_rng(seed)
    n = np.repeat(SIZES, seeds)
    x = np.log2(n)
    return n, f(x) + noise * rng.standard_normal(len(x))


def test_linear_fit_matches_linregress_polyfit_and_a_hand_lack_of_fit():
    n, y = _runs(lambda x: 0.5 + 0.03 * x)
    x = np.log2(n)
    f = scaling.fit(n, y)
    ref = scipy_stats.linregress(x, y)
    np.testing.assert_allclose([f.slope, f.intercept, f.slope_se, f.r2],
                               [ref.slope, ref.intercept, ref.stderr, ref.rvalue ** 2], rtol=1e-10)
    half = scipy_stats.t.ppf(0.975, len(x) - 2) * ref.stderr
    np.testing.assert_allclose([f.slope_low, f.slope_high], [ref.slope - half, ref.slope + half], rtol=1e-10)
    assert f.slope_low < 0.03 < f.slope_high
    # quadratic term: numpy's own fit and its covariance (scaled by chi2 / (N - 3))
    coef, cov = np.polyfit(x, y, 2, cov=True)
    t = coef[0] / np.sqrt(cov[0, 0])
    np.testing.assert_allclose(f.quad, coef[0], rtol=1e-8)
    np.testing.assert_allclose(f.quad_p, 2 * scipy_stats.t.sf(abs(t), len(x) - 3), rtol=1e-6)
    # lack of fit: the line's residual SS split into pure error (within sizes) and the rest
    sse = np.sum((y - ref.intercept - ref.slope * x) ** 2)
    pure = sum(np.var(y[x == v]) * np.sum(x == v) for v in np.unique(x))
    m, N = len(SIZES), len(x)
    F = ((sse - pure) / (m - 2)) / (pure / (N - m))
    np.testing.assert_allclose(f.lack_of_fit_p, scipy_stats.f.sf(F, m - 2, N - m), rtol=1e-8)
    assert f.linear() is True and f.quad_p > 0.05 and f.lack_of_fit_p > 0.05
    runs = [dict(n=a, value=b) for a, b in zip(n, y)]
    assert "the claim holds for n = 64–4096" in scaling.verdict("lora", runs, f)


def test_a_saturating_curve_is_rejected_as_a_line():
    n, y = _runs(lambda x: 0.2 + 0.12 * x - 0.006 * x ** 2)  # gains shrink: 0.04 ... -0.02 per doubling
    f = scaling.fit(n, y)
    np.testing.assert_allclose(f.quad, np.polyfit(np.log2(n), y, 2)[0], rtol=1e-8)
    assert f.quad < 0 and f.quad_p < 1e-6 and f.lack_of_fit_p < 1e-6 and f.linear() is False
    text = scaling.verdict("full", [dict(n=a, value=b) for a, b in zip(n, y)], f)
    assert "does not hold over all of n = 64–4096" in text
    # the gain is largest at the small sizes: the widest linear, rising window starts there
    lo, hi = scaling.linear_range(list(n), list(y))
    assert lo == 64 and hi < 4096


def test_fit_needs_two_sizes_and_says_so():
    with pytest.raises(scaling.SweepError, match="at least 2 train sizes"):
        scaling.fit([64, 64], [0.5, 0.6])
    f = scaling.fit([64, 128], [0.5, 0.6])  # a line through 2 points: no interval, no tests
    assert f.slope == pytest.approx(0.1) and np.isnan(f.slope_low) and f.linear() is None


# ----------------------------------------------------------------------------- nested subsets

TRAIN = [f"{i % 2} sentence number {i} about item {i * 7 % 101}" for i in range(200)]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("subset")
    return write(d / "train.txt", "\n".join(TRAIN) + "\n")


def _cfg(path, **kw):
    return data_cfg(task="classification", format="label_text", train_path=path, clean__leakage="off",
                    **{f"subset__{k}": v for k, v in kw.items()})


def test_subsets_are_nested_sized_by_fraction_and_keyed(train_file):
    records = sources.read_split(_cfg(train_file), "train")
    got = {d: prepare.subset(records, 1 / d, seed=0) for d in (64, 32, 8, 2, 1)}
    wheres = {d: [r.where for r in rs] for d, rs in got.items()}
    for small, large in [(64, 32), (32, 8), (8, 2), (2, 1)]:
        assert set(wheres[small]) < set(wheres[large])
    assert {d: len(w) for d, w in wheres.items()} == {64: 3, 32: 6, 8: 25, 2: 100, 1: 200}
    assert all(w == sorted(w, key=lambda s: int(s.rsplit(":", 1)[1])) for w in wheres.values())  # file order
    other = [r.where for r in prepare.subset(records, 1 / 8, seed=1)]
    assert len(other) == 25 and other != wheres[8]
    # through the pipeline: the step is in the data report, the key changes with fraction and seed
    tok = bert_tokenizer()
    p = prepare.prepare(_cfg(train_file, fraction=1 / 8), tok)
    assert p.report["splits"]["train"]["steps"][-1] == {"step": "subset", "rows": 25, "fraction": 1 / 8, "seed": 0}
    assert p.report["splits"]["train"]["rows"] == len(p.examples["train"]) == 25
    keys = {prepare.cache_key(_cfg(train_file, **kw), tok) for kw in
            ({}, dict(fraction=0.5), dict(fraction=0.25), dict(fraction=0.5, seed=1))}
    assert len(keys) == 4


@pytest.mark.parametrize("fraction,match", [(0.0, r"fraction=0.0 is not in \(0, 1\]"),
                                            (1.5, r"fraction=1.5 is not in \(0, 1\]"),
                                            (1e-3, r"fraction=0.001 of the 200 cleaned train rows keeps no row")])
def test_bad_fractions_are_one_line_naming_the_key(train_file, fraction, match):
    with pytest.raises(DataError, match=match) as e:
        prepare.prepare(_cfg(train_file, fraction=fraction), bert_tokenizer())
    assert "\n" not in str(e.value) and "config.data.subset.fraction" in str(e.value)


# ----------------------------------------------------------------------------- end to end

ARG = "fractions=16+1,seeds=1,methods=lora"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """configs/scaling.py's arms on tiny-bert, 64 train rows (n = 4 and 64), trained in-process."""
    from ftjax.configs import scaling as study_config
    from ftjax.experiments.sweep import expand_arms
    from ftjax.train.fused_plan import with_overrides
    from ftjax.train.loop import train

    d = tmp_path_factory.mktemp("scaling")
    config = study_config.get_config(f"model=tiny-bert,steps=4,batch=8,seq_len=16,{ARG}")
    config.data.tokenizer = bert_tokenizer().name_or_path
    config.data.train_path = write(d / "train.txt", "\n".join(TRAIN[:64]) + "\n")
    config.data.eval_path = write(d / "dev.txt", "\n".join(TRAIN[100:132]) + "\n")
    config.data.clean.leakage = "off"
    config.mesh.update(fsdp=1, num_devices=1)
    config.checkpoint.async_save = False
    config.log.tensorboard = False
    arms = expand_arms(study_config.sweep(ARG))
    for arm in arms:
        train(with_overrides(config, arm.overrides), d / "arms" / arm.name)
    path, text = study_config.study(d, arms, config)
    return d, arms, path, text


def test_report_end_to_end(study):
    d, arms, path, text = study
    assert [a.name for a in arms] == ["lora-1of16-s0", "lora-1of1-s0"]
    acc = {a.name: json.loads((d / "arms" / a.name / "eval" / "metrics.json").read_text())["accuracy"]
           for a in arms}
    small, full = acc["lora-1of16-s0"], acc["lora-1of1-s0"]
    assert f"| 4 | 2.00 | {small:.4f} ± 0.0000 (1) |" in text
    assert f"| 64 | 6.00 | {full:.4f} ± 0.0000 (1) |" in text
    slope = (full - small) / (6 - 2)  # a line through the two points, by hand
    fit_row = next(line for line in text.splitlines() if line.startswith("| lora | 2 | 2 |"))
    cells = [c.strip() for c in fit_row.split("|")[1:-1]]
    assert float(cells[3]) == pytest.approx(slope, abs=1e-4) and cells[4] == "—" and cells[5] == "1.000"
    assert "fixed, 4 steps × 8 examples per arm" in text and "too few runs to test" in text
    assert path == d / "scaling.md" and path.read_text() == text
    assert (d / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_command_writes_the_study_report(study):
    """``scripts/sweep.py --report_only`` over the finished arms runs the config's study()."""
    d, *_ = study
    (d / "scaling.md").unlink()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "sweep.py"),
                           f"--config={REPO / 'configs' / 'scaling.py'}:{ARG}", f"--workdir={d}", "--report_only"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "study report:" in proc.stdout and "| lora | 2 | 2 |" in (d / "scaling.md").read_text()
