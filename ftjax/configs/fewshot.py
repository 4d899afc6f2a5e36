"""Few-shot SST-2 on SmolLM2-135M-Instruct: k-shot fine-tuning vs in-context, same template.

Fine-tuning arms (``sweep()``): k = 4, 8, 16, 32 examples per label, 3 draws each (the data
pipeline's stratified k-shot sampler; draw d also uses train seed d). In-context: the same k,
template, verbalisers and draws, scored by log-likelihood (``ftjax.eval.incontext``).

    python scripts/fewshot.py --config=configs/fewshot.py --workdir=runs/fewshot

writes the sweep report (report.md) and fewshot.md + learning_curve.png (mean ± std over draws
against k). ``:ks=4+8,draws=2,max_eval=200`` shrinks it; ``model=tiny-llama`` is a smoke run.
"""

from ftjax.config import base_config, finalize, parse_arg
from ftjax.data import presets
from ftjax.models.assets import smollm2_gguf_path



def _args(arg):
    return parse_arg(arg, model="", ks="4+8+16+32", draws=3, steps=60, lr=1e-5, max_eval=0)


def ks(arg=None) -> list[int]:
    """The k values (examples per label) of the study."""
    return [int(k) for k in _args(arg).ks.split("+")]


def get_config(arg=None):
    a = _args(arg)
    c = base_config()
    c.model.source = a.model or str(smollm2_gguf_path())
    if a.model:  # a preset (e.g. tiny-llama): borrow SmolLM2's tokenizer from its GGUF
        c.data.tokenizer = str(smollm2_gguf_path().parent)
        c.data.tokenizer_file = smollm2_gguf_path().name
        c.model.overrides = {"vocab_size": 49152}  # SmolLM2's vocabulary
    presets.sst2(c.data, task="text_to_text")
    c.data.seq_len = 128
    c.incontext.draws = a.draws
    c.incontext.max_examples = a.max_eval
    c.train.steps = a.steps
    c.train.batch_size = 8
    c.train.learning_rate = a.lr
    c.train.warmup_steps = max(1, a.steps // 10)
    c.eval.batch_size = 8
    c.eval.max_batches = -(-a.max_eval // c.eval.batch_size) if a.max_eval else 0
    c.eval.best_metric = "accuracy"
    c.eval.best_mode = "max"
    c.checkpoint.every_steps = a.steps
    c.checkpoint.keep = 1
    c.log.every_steps = 20
    return finalize(c)


def sweep(arg=None):
    """k-shot fine-tuning arms: every k, every draw (draw d trains with seed d)."""
    draws = _args(arg).draws
    return [{"name": f"ft-k{k}-d{d}", "group": f"finetune k={k}", "data.kshot.k": k,
             "data.kshot.draw": d, "train.seed": d} for k in ks(arg) for d in range(draws)]
