"""SST-2 as text-to-text on SmolLM2-135M-Instruct: in-context few-shot (scripts/incontext.py)
or k-shot fine-tuning (scripts/train.py with ``--config.data.kshot.k=K``) on the same template,
verbalisers and k-shot draws.

Variants: ``--config=configs/sst2_incontext.py:k=2,draws=5,max_examples=200``.
"""

from ftjax.config import base_config, finalize, parse_arg
from ftjax.data import presets
from ftjax.models.assets import smollm2_gguf_path



def get_config(arg=None):
    a = parse_arg(arg, k=1, draws=3, max_examples=0, calibrate=True)
    c = base_config()
    c.model.source = str(smollm2_gguf_path())
    presets.sst2(c.data, task="text_to_text")
    c.data.seq_len = 128
    c.incontext.k = a.k
    c.incontext.draws = a.draws
    c.incontext.max_examples = a.max_examples
    c.incontext.calibrate = a.calibrate
    c.train.steps = 100
    c.train.batch_size = 8
    c.train.learning_rate = 1e-5
    c.eval.batch_size = 8
    return finalize(c)
