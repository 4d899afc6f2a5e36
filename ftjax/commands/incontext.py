"""In-context few-shot evaluation of a causal LM (the baseline for k-shot fine-tuning).

ftjax-incontext --config=NAME|FILE.py [--workdir=DIR [--checkpoint=latest|best|STEP]]
    [--out=FILE] [--config.incontext.k=2 --config.incontext.draws=5 ...]

Without a workdir holding checkpoints it evaluates ``config.model.source`` as loaded (a
pretrained model); with one, the trained weights. Writes ``DIR/eval/incontext.json`` (or --out).
"""

import json
from pathlib import Path

import jax
from absl import flags
from ml_collections import config_flags

from ftjax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (or the name of a shipped config).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; its checkpoints are used when present.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest | best | a step number.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON result (default DIR/eval/incontext.json).")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    from ftjax.eval.incontext import evaluate_incontext, format_summary
    from ftjax.train.experiment import build
    from ftjax.train.loop import load_trained

    config = _CONFIG.value
    workdir = Path(_WORKDIR.value) if _WORKDIR.value else None
    if workdir is not None and (workdir / "checkpoints").is_dir():
        exp, step = load_trained(config, workdir, _CHECKPOINT.value)
    else:
        exp, step = build(config), None
    if exp.kind != "lm":
        raise SystemExit(f"in-context evaluation needs a causal LM (config.model.head='causal_lm'), "
                         f"not {config.model.head!r}")
    result = evaluate_incontext(exp.model, exp.tokenizer, config, exp.mesh)
    result["checkpoint_step"] = step
    if jax.process_index() == 0:
        print(format_summary(result))
        out = Path(_OUT.value) if _OUT.value else (workdir / "eval" / "incontext.json" if workdir else None)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2))
            print(f"wrote {out}")


def run() -> None:
    """The ``ftjax-incontext`` console script (``python -m ftjax.commands.incontext``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
