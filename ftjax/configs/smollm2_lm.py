"""SmolLM2-135M (Llama architecture, from the offline Q4_1 GGUF) as a causal LM on SST-2 sentences,
for any ``config.method.kind``.

    python scripts/train.py --config=configs/smollm2_lm.py --workdir=runs/smollm2_lora \\
        --config.method.kind=lora
Variants: ``--config=configs/smollm2_lm.py:steps=200,batch=16,seq_len=256``.
"""

from ftjax.config import base_config, finalize, parse_arg
from ftjax.data import presets
from ftjax.models.assets import smollm2_gguf_path



def get_config(arg=None):
    a = parse_arg(arg, steps=50, batch=8, seq_len=128, lr=1e-3)
    c = base_config()
    c.model.source = str(smollm2_gguf_path())  # tokenizer embedded in the GGUF
    c.model.head = "causal_lm"
    c.method.kind = "lora"
    c.method.lora.targets = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
    presets.sst2(c.data, task="lm")
    c.data.seq_len = a.seq_len
    c.train.steps = a.steps
    c.train.batch_size = a.batch
    c.train.learning_rate = a.lr
    c.train.warmup_steps = 5
    c.checkpoint.every_steps = 50
    c.eval.batch_size = 8
    c.eval.max_batches = 8
    return finalize(c)
