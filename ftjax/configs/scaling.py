"""Data scaling on SST-2: does each doubling of the train set add the same accuracy?

The demo's model, data and methods (``configs/demo.py``: all-MiniLM-L6-v2, mean pooling, the
6,920 SST-2 train sentences, the 872-sentence dev set) trained on nested subsets of the train
split (``config.data.subset``: 1/64 ... 1/1 of the cleaned rows, one fixed permutation, so each
subset holds every smaller one) with LoRA and full fine-tuning over seeds. The step budget is
fixed: every arm trains ``steps`` steps of ``batch`` examples whatever its size (small subsets
see many epochs). The eval set is the same for every arm (its first ``max_eval`` sentences).

    python scripts/sweep.py --config=configs/scaling.py --workdir=runs/scaling

writes the sweep report (report.md) and scaling.md + scaling.png (``study()``, run by the sweep
command after its report): mean ± std per size, the least-squares fit of accuracy against
log2(train rows) per method with the slope per doubling, its 95% CI and two linearity tests.
``:fractions=64+8+1,seeds=3,methods=lora,steps=100,max_eval=512`` reshapes it.
"""

from ftjax.config import ConfigArgError, parse_arg
from ftjax.configs import demo


def _args(arg):
    return parse_arg(arg, model="", fractions="64+32+16+8+4+2+1", seeds=2, methods="lora+full",
                     steps=60, batch=32, seq_len=48, max_eval=0, subset_seed=0)


def get_config(arg=None):
    a = _args(arg)
    c = demo.get_config(f"model={a.model},steps={a.steps},batch={a.batch},seq_len={a.seq_len}")
    c.data.subset.seed = a.subset_seed
    c.eval.max_batches = -(-a.max_eval // c.eval.batch_size) if a.max_eval else 0
    return c


def sweep(arg=None):
    """Every fraction 1/D (``fractions``: the denominators D) x method x seed."""
    a = _args(arg)
    methods, denominators = a.methods.split("+"), a.fractions.split("+")
    for m in methods:
        if m not in demo.LEARNING_RATES:
            raise ConfigArgError(f"config argument methods={a.methods!r}: {m!r} is not one of "
                                 f"{sorted(demo.LEARNING_RATES)} (the demo's learning rates)")
    if not all(d.isdigit() and int(d) >= 1 for d in denominators):
        raise ConfigArgError(f"config argument fractions={a.fractions!r} must be denominators D >= 1 "
                             "joined by '+' (64+8+1 = 1/64, 1/8 and all of the train rows)")
    denominators = [int(d) for d in denominators]
    return [{"name": f"{m}-1of{d}-s{s}", "group": f"{m} 1/{d}", "method.kind": m,
             "train.learning_rate": demo.LEARNING_RATES[m], "data.subset.fraction": 1 / d,
             "train.seed": s} for m in methods for d in denominators for s in range(a.seeds)]


def study(workdir, arms, config):
    """scaling.md and scaling.png: the fit of the metric against log2(train rows), per method."""
    from ftjax.experiments import scaling
    return scaling.write_report(workdir, arms, config.eval.best_metric)
