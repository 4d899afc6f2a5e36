"""Sequential fine-tuning: SST-2 sentiment, then TREC question type, on all-MiniLM-L6-v2.

After each stage both tasks are evaluated: the accuracy matrix, backward/forward transfer and
forgetting go to DIR/report.md and DIR/accuracy_matrix.png.

    python scripts/sequential.py --config=configs/sequential.py --workdir=runs/sequential
    python scripts/sequential.py --config=configs/sequential.py:reg=ewc,strength=1e4,replay=0.1 ...

``reg`` = none | l2sp | ewc (against forgetting, from the second stage on); ``replay`` = the
fraction of each later-stage batch drawn from earlier tasks. TREC comes from ``data`` (the
shared data folder by default); ``model=tiny-bert`` gives a seconds-long smoke run.
"""

from pathlib import Path

from ftjax.config import base_config, finalize, parse_arg
from ftjax.data import presets
from ftjax.models.assets import minilm_path

REPO = Path(__file__).resolve().parents[2]


def get_config(arg=None):
    a = parse_arg(arg, model="", data=str(REPO.parent / "shared" / "data"), steps=150, batch=32,
                  seq_len=64, reg="none", strength=0.0, replay=0.0, method="full", lr=1e-4)
    c = base_config()
    c.model.source = a.model or str(minilm_path())
    if not Path(c.model.source).is_dir():  # a preset (e.g. tiny-bert): borrow MiniLM's tokenizer
        c.data.tokenizer = str(minilm_path())
    c.model.head = "sequence_classification"
    c.method.kind = a.method
    presets.sst2_trec_mixture(c.data, a.data)
    c.data.seq_len = a.seq_len
    c.stages = [dict(task="sst2", steps=a.steps), dict(task="trec", steps=a.steps, replay=a.replay)]
    c.regularizer.kind = a.reg
    c.regularizer.strength = a.strength
    c.train.batch_size = a.batch
    c.train.learning_rate = a.lr
    c.train.warmup_steps = max(1, a.steps // 10)
    c.eval.batch_size = 64
    c.checkpoint.every_steps = a.steps
    c.checkpoint.keep = 1
    c.log.every_steps = 25
    return finalize(c)
