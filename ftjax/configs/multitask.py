"""Multi-task learning: SST-2 sentiment + TREC question type in one run on all-MiniLM-L6-v2,
against each task alone with the same budget (steps x batch), over seeds.

    python scripts/multitask.py --config=configs/multitask.py --workdir=runs/multitask

writes the sweep report (report.md, results.csv, plots) and tasks.md: per task, the multi-task
arms vs that task's single-task arms (mean ± std, CI, paired test) and each multi-task arm's best
evaluation per task with its step. One run alone: ``scripts/train.py --config=configs/multitask.py``
(per-task losses in the train log, ``<task>/accuracy`` in every eval).
"""

from pathlib import Path

from ftjax.config import base_config, finalize, parse_arg
from ftjax.data import presets
from ftjax.models.assets import minilm_path

REPO = Path(__file__).resolve().parents[2]
TASKS = ("sst2", "trec")
SEEDS = (0, 1)


def get_config(arg=None):
    a = parse_arg(arg, model="", data=str(REPO.parent / "shared" / "data"), steps=300, batch=32,
                  seq_len=64, lr=1e-4, weighting="proportional")
    c = base_config()
    c.model.source = a.model or str(minilm_path())
    if not Path(c.model.source).is_dir():  # a preset (e.g. tiny-bert): borrow MiniLM's tokenizer
        c.data.tokenizer = str(minilm_path())
    c.model.head = "sequence_classification"
    presets.sst2_trec_mixture(c.data, a.data)
    c.data.seq_len = a.seq_len
    c.data.mixture.weighting = a.weighting
    c.data.mixture.weights = {t: 1.0 for t in TASKS}  # used by weighting=explicit (single-task arms)
    c.train.steps = a.steps
    c.train.batch_size = a.batch
    c.train.learning_rate = a.lr
    c.train.warmup_steps = max(1, a.steps // 10)
    c.eval.every_steps = max(1, a.steps // 3)
    c.eval.batch_size = 64
    c.eval.best_metric = "accuracy"
    c.eval.best_mode = "max"
    c.checkpoint.every_steps = a.steps
    c.checkpoint.keep = 1
    c.log.every_steps = 25
    return finalize(c)


def sweep():
    """The multi-task arm and one single-task arm per task (other tasks at weight 0), per seed."""
    arms = []
    for seed in SEEDS:
        arms.append({"name": f"multi-s{seed}", "group": "multi-task", "train.seed": seed})
        for task in TASKS:
            arms.append({"name": f"{task}-s{seed}", "group": f"{task} only", "train.seed": seed,
                         "data.mixture.weighting": "explicit",
                         **{f"data.mixture.weights.{t}": float(t == task) for t in TASKS}})
    return arms
