"""The README's main job: compare fine-tuning methods on real data with a real pretrained model.

all-MiniLM-L6-v2 (a 22.7M-parameter BERT, installed offline) classifies SST-2 sentiment
(the 6,920 SST-2 training sentences shipped in ftjax/data/assets/sst2; the 872-sentence dev set,
the same sentences as GLUE's). ``sweep()`` runs each method
over seeds; ``scripts/sweep.py`` turns the arms into results.csv, report.md and plots.

    python scripts/sweep.py --config=configs/demo.py --workdir=runs/demo

Scaling the same study to a real model on a TPU VM is a matter of arguments, e.g.
``--config=configs/demo.py:model=FacebookAI/roberta-large,pooling=pooler,steps=3000,batch=64,dtype=bfloat16``
(the default mesh already spreads fsdp over every chip; RoBERTa's head pools ``<s>`` itself).

Every arm classifies the same pooled vector, ``config.model.pooling`` (``pooling=`` here, default
``mean``: all-MiniLM-L6-v2 is a sentence-transformers checkpoint trained for mean pooling, as its
``1_Pooling/config.json`` says); the head-only arm names it (``head-mean``), since a linear probe
is only as good as what it probes.
"""

from ftjax.config import base_config, finalize, parse_arg
from ftjax.data import presets
from ftjax.models.assets import minilm_path

METHODS = ("head", "lora", "pfeiffer", "bitfit", "full")
SEEDS = (0, 1)
# Per-method learning rates (a small model, a short budget): parameter-efficient methods need
# larger steps than full fine-tuning.
LEARNING_RATES = {"head": 3e-3, "lora": 3e-3, "pfeiffer": 1e-3, "bitfit": 3e-3, "full": 2e-4}


def _args(arg):
    return parse_arg(arg, model="", pooling="mean", steps=200, batch=32, seq_len=48, dtype="float32")


def get_config(arg=None):
    a = _args(arg)
    c = base_config()
    c.model.source = a.model or str(minilm_path())
    c.model.head = "sequence_classification"
    c.model.pooling = a.pooling
    c.model.dtype = a.dtype  # bfloat16 on TPU/GPU; parameters stay float32
    presets.sst2(c.data)
    c.data.seq_len = a.seq_len
    # LoRA (r=8) on the attention queries and values, plus the [CLS] pooler when it pools (this
    # sentence-embedding checkpoint never trained it for classification).
    pooler = "|pooler/dense" if a.pooling == "pooler" else ""
    c.method.lora.targets = rf"(self/query|self/value{pooler})$"
    c.train.steps = a.steps
    c.train.batch_size = a.batch
    c.train.learning_rate = LEARNING_RATES["full"]
    c.train.warmup_steps = max(1, a.steps // 10)
    c.train.weight_decay = 0.01
    c.eval.batch_size = 64
    c.eval.best_metric = "accuracy"
    c.eval.best_mode = "max"
    c.checkpoint.every_steps = a.steps
    c.checkpoint.keep = 1
    c.log.every_steps = 20
    return finalize(c)


def sweep(arg=None):
    pooling = _args(arg).pooling
    label = {m: f"head-{pooling}" if m == "head" else m for m in METHODS}  # what the probe probes
    return [{"name": f"{label[m]}-s{s}", "group": label[m], "method.kind": m, "train.seed": s,
             "train.learning_rate": LEARNING_RATES[m]} for s in SEEDS for m in METHODS]
