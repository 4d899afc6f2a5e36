"""k-shot fine-tuning vs in-context few-shot: run the config's sweep() arms, the in-context
evaluations at the same k, then the learning curve.

ftjax-fewshot --config=fewshot[:ARG] --workdir=DIR [--parallel=N]

Writes DIR/report.md (the sweep report), DIR/incontext/k<K>.json, DIR/fewshot.md and
DIR/learning_curve.png. Finished arms and in-context results are reused.
"""

from absl import flags

from ftjax import cli

_CONFIG = flags.DEFINE_string("config", None, "Config file with sweep() and ks().")
_WORKDIR = flags.DEFINE_string("workdir", None, "Study directory.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Fine-tuning arms run at the same time.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from ftjax.experiments import fewshot, launchers, report, sweep

    path, _, arg = _CONFIG.value.partition(":")
    module = sweep.load_config_module(path)
    arg = arg or None
    config, ks = module.get_config(arg), module.ks(arg)
    arms = sweep.expand_arms(module.sweep(arg))
    launchers.LocalLauncher(_CONFIG.value, _WORKDIR.value, parallel=_PARALLEL.value).run(arms)
    report.write_report(_WORKDIR.value, arms, config.eval.best_metric,
                        higher_is_better=config.eval.best_mode == "max")
    incontext = fewshot.run_incontext(config, ks, _WORKDIR.value)
    out, text = fewshot.learning_curve(_WORKDIR.value, arms, ks, incontext, config.eval.best_metric)
    print(f"\n{text}\nreport: {out}")


def run() -> None:
    """The ``ftjax-fewshot`` console script (``python -m ftjax.commands.fewshot``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
