"""all-MiniLM-L6-v2 (BERT, 22.7M params) classifying SST-2, for any ``config.method.kind``.

    python scripts/train.py --config=configs/minilm_sst2.py --workdir=runs/minilm_lora \\
        --config.method.kind=lora
Variants: ``--config=configs/minilm_sst2.py:steps=300,lr=3e-4``.
"""

from pathlib import Path

from ftjax.config import base_config, finalize, parse_arg
from ftjax.models.assets import minilm_path

ASSETS = Path(__file__).resolve().parent.parent / "ftjax" / "data" / "assets" / "sst2"


def get_config(arg=None):
    a = parse_arg(arg, steps=100, batch=32, seq_len=64, lr=1e-3)
    c = base_config()
    c.model.source = str(minilm_path())
    c.model.head = "sequence_classification"
    c.method.kind = "lora"
    c.data.task = "classification"
    c.data.format = "label_text"
    c.data.train_path = str(ASSETS / "stsa.binary.train")
    c.data.eval_path = str(ASSETS / "stsa.binary.dev")
    c.data.labels = ["0", "1"]
    c.data.label_names = ["negative", "positive"]
    c.data.seq_len = a.seq_len
    c.train.steps = a.steps
    c.train.batch_size = a.batch
    c.train.learning_rate = a.lr
    c.train.warmup_steps = 10
    c.checkpoint.every_steps = 50
    c.eval.batch_size = 64
    c.eval.best_metric = "accuracy"
    c.eval.best_mode = "max"
    return finalize(c)
