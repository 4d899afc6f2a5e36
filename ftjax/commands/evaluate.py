"""Evaluate a trained run: ftjax-eval --config=... --workdir=DIR [--checkpoint=latest|best|STEP]."""

import jax
from absl import flags
from ml_collections import config_flags

from ftjax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (or the name of a shipped config).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest | best | a step number.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from ftjax.eval import tasks as eval_tasks
    from ftjax.eval.loop import Evaluator
    from ftjax.eval.metrics import format_table
    from ftjax.eval.plots import save_confusion_matrix
    from ftjax.paths import as_path
    from ftjax.train.loop import load_trained, write_eval

    config = _CONFIG.value
    exp, step = load_trained(config, _WORKDIR.value, _CHECKPOINT.value)
    if not exp.pipe.has_eval:
        raise SystemExit("the config has no eval split (config.data); nothing to evaluate")
    evaluator = Evaluator.for_experiment(exp)
    metrics = eval_tasks.evaluate(evaluator, exp.params, exp.frozen, exp.pipe,
                                  config.eval.batch_size, config.eval.max_batches)
    if jax.process_index() == 0:
        workdir = as_path(_WORKDIR.value)
        write_eval(workdir, metrics, step)
        print(f"checkpoint step {step}\n{format_table(metrics)}")
        if "confusion_matrix" in metrics:
            png = save_confusion_matrix(metrics["confusion_matrix"], exp.pipe.info.label_names,
                                        workdir / "eval" / "confusion_matrix.png",
                                        title=f"{config.data.task}, step {step}")
            print(f"wrote {workdir / 'eval' / 'metrics.json'} and {png}")


def run() -> None:
    """The ``ftjax-eval`` console script (``python -m ftjax.commands.evaluate``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
