"""Few-shot SST-2: k-shot fine-tuning (from the pretrained and from a meta-learned model) vs
in-context, same template and k.

Fine-tuning arms (``sweep()``): k = 4, 8, 16, 32 examples per label, 3 draws each (the data
pipeline's stratified k-shot sampler; draw d also uses train seed d). ``scripts/fewshot.py`` also
meta-trains (``config.meta``: first-order MAML or Reptile over episodes of TREC, SMS spam and
Financial PhraseBank, ``ftjax.experiments.meta``) and repeats every arm from the meta-learned
weights. In-context (decoders only): the same k, template, verbalisers and draws, scored by
log-likelihood (``ftjax.eval.incontext``).

    python scripts/fewshot.py --config=configs/fewshot.py --workdir=runs/fewshot
    python scripts/fewshot.py --config=configs/fewshot.py:model=minilm --workdir=runs/fewshot_minilm

writes the sweep report (report.md) and fewshot.md + learning_curve.png (mean ± std and 95%
bootstrap CI over draws against k). ``:ks=4+8,draws=2,max_eval=200`` shrinks it;
``model=tiny-llama`` / ``model=tiny-bert`` are smoke runs. ``model=minilm`` (and tiny-bert) is
SST-2 classification with LoRA on all-MiniLM-L6-v2 (mean pooling), its episode head
zero-initialised per task; the default is SmolLM2-135M-Instruct, text_to_text, full fine-tuning.
"""

from pathlib import Path

from ftjax.config import base_config, finalize, parse_arg
from ftjax.data import presets
from ftjax.experiments.meta import meta_config
from ftjax.models.assets import minilm_path, smollm2_gguf_path

REPO = Path(__file__).resolve().parents[2]


def _args(arg):
    return parse_arg(arg, model="", ks="4+8+16+32", draws=3, steps=0, lr=0.0, max_eval=0, seq_len=0,
                     data=str(REPO.parent / "shared" / "data"), algorithm="fomaml", meta_steps=100,
                     meta_batch=2, meta_k=4, queries=8, inner_steps=5, inner_lr=0.0, meta_lr=0.0,
                     meta_optimizer="")


def ks(arg=None) -> list[int]:
    """The k values (examples per label) of the study."""
    return [int(k) for k in _args(arg).ks.split("+")]


def _encoder(a) -> bool:
    return a.model == "minilm" or a.model.startswith("tiny-bert")


def get_config(arg=None):
    a = _args(arg)
    encoder = _encoder(a)
    c = base_config()
    if encoder:
        c.model.source = str(minilm_path()) if a.model == "minilm" else a.model
        if a.model != "minilm":  # a preset: borrow MiniLM's tokenizer
            c.data.tokenizer = str(minilm_path())
        c.model.head = "sequence_classification"
        c.model.pooling = "mean"
        presets.sst2(c.data)
        c.data.seq_len = a.seq_len or 64
        c.method.kind = "lora"
        c.method.lora.targets = r"(self/query|self/value)$"
        steps, lr = a.steps or 30, a.lr or 3e-3
        inner_lr, meta_lr, optimizer = a.inner_lr or 0.1, a.meta_lr or 1e-3, a.meta_optimizer or "adamw"
    else:
        c.model.source = a.model or str(smollm2_gguf_path())
        if a.model:  # a preset (e.g. tiny-llama): borrow SmolLM2's tokenizer from its GGUF
            c.data.tokenizer = str(smollm2_gguf_path().parent)
            c.data.tokenizer_file = smollm2_gguf_path().name
            c.model.overrides = {"vocab_size": 49152}  # SmolLM2's vocabulary
        presets.sst2(c.data, task="text_to_text")
        c.data.seq_len = a.seq_len or 128
        steps, lr = a.steps or 60, a.lr or 1e-5
        inner_lr, meta_lr, optimizer = a.inner_lr or 1e-3, a.meta_lr or 1e-5, a.meta_optimizer or "adamw"
    c.incontext.draws = a.draws
    c.incontext.max_examples = a.max_eval
    c.train.steps = steps
    c.train.batch_size = 8
    c.train.learning_rate = lr
    c.train.warmup_steps = max(1, steps // 10)
    c.eval.batch_size = 8
    c.eval.max_batches = -(-a.max_eval // c.eval.batch_size) if a.max_eval else 0
    c.eval.best_metric = "accuracy"
    c.eval.best_mode = "max"
    c.checkpoint.every_steps = steps
    c.checkpoint.keep = 1
    c.log.every_steps = 20
    c.meta = meta_config()
    c.meta.update(algorithm=a.algorithm, k=a.meta_k, queries=a.queries, inner_steps=a.inner_steps,
                  inner_lr=inner_lr, meta_steps=a.meta_steps, meta_batch=a.meta_batch, meta_lr=meta_lr,
                  optimizer=optimizer)
    c.meta.tasks = {"trec": presets.trec_task(a.data), "sms_spam": presets.sms_spam_task(a.data),
                    "fpb": presets.financial_phrasebank_task(a.data)}
    return finalize(c)


def sweep(arg=None):
    """k-shot fine-tuning arms: every k, every draw (draw d trains with seed d)."""
    draws = _args(arg).draws
    return [{"name": f"ft-k{k}-d{d}", "group": f"finetune k={k}", "data.kshot.k": k,
             "data.kshot.draw": d, "train.seed": d} for k in ks(arg) for d in range(draws)]
