"""Optional W&B logging, offline: the run holds exactly the numbers of metrics.jsonl under the
same names, with the config's project, name and group."""

import io
import math
import sys

import pytest

from ftjax.configs.tiny import get_config
from ftjax.errors import MissingExtraError
from ftjax.train.logger import MetricsLogger, read_metrics, wandb_options
from tests.wandb_offline import offline_env, offline_runs, read_run

ROWS = [(2, {"loss": 1.5, "learning_rate": 1e-3, "tokens": 512}, "train"),
        (2, {"accuracy": 0.5, "confusion_matrix": [[1, 0], [0, 1]]}, "eval"),
        (4, {"loss": float("nan"), "learning_rate": 5e-4, "tokens": 1024}, "train")]


def _logger(tmp_path, **log):
    config = get_config()
    config.log.wandb = True
    for k, v in log.items():
        config.log[k] = v
    workdir = tmp_path / "run_a"
    return MetricsLogger(workdir, total_steps=4, tensorboard=False, stream=io.StringIO(),
                         wandb=wandb_options(config, workdir)), workdir


def test_wandb_run_holds_the_logged_rows(tmp_path, monkeypatch):
    for k, v in offline_env(tmp_path / "wandb_home").items():
        monkeypatch.setenv(k, v)
    logger, workdir = _logger(tmp_path, wandb_project="ablations", wandb_group="sweep_x")
    logger.start(0)
    for step, metrics, prefix in ROWS:
        logger.log(step, metrics, prefix=prefix)
    logger.close()

    (run_dir,) = offline_runs(workdir)
    run, history = read_run(run_dir)
    expected = {row["step"]: {k: v for k, v in row.items() if k not in ("step", "run")
                              and isinstance(v, (int, float)) and math.isfinite(v)}
                for row in read_metrics(workdir)}
    assert history == expected, (history, expected)
    assert expected[2] == {"train/loss": 1.5, "train/learning_rate": 1e-3, "train/tokens": 512,
                           "eval/accuracy": 0.5}
    assert (run["project"], run["display_name"], run["run_group"]) == ("ablations", "run_a", "sweep_x")
    config = run["config"]["update"]
    assert config["train"]["steps"] == get_config().train.steps
    assert config["ftjax_run"] == logger.run


def test_missing_wandb_names_its_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    logger, _ = _logger(tmp_path)
    with pytest.raises(MissingExtraError, match=r"log.wandb=True.*pip install 'ftjax\[wandb\]'"):
        logger.start(0)
