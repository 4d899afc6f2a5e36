"""Multi-task vs single-task comparison: run a config's sweep() arms, then the reports.

ftjax-multitask --config=multitask[:ARG] --workdir=DIR [--parallel=N]

Writes DIR/report.md (the sweep report on config.eval.best_metric) and DIR/tasks.md (per task:
multi-task vs single-task arms, and the multi-task arms' best evaluation per task).
"""

from absl import flags

from ftjax import cli

_CONFIG = flags.DEFINE_string("config", None, "Config file with sweep() and a data mixture.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: arms/, report.md, tasks.md.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Arms run at the same time.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from ftjax.experiments import launchers, multitask, report, sweep

    path, _, arg = _CONFIG.value.partition(":")
    module = sweep.load_config_module(path)
    config = module.get_config(arg or None)
    arms = sweep.expand_arms(module.sweep())
    launchers.LocalLauncher(_CONFIG.value, _WORKDIR.value, parallel=_PARALLEL.value).run(arms)
    higher = config.eval.best_mode == "max"
    report.write_report(_WORKDIR.value, arms, config.eval.best_metric, higher_is_better=higher)
    out, text = multitask.write_report(_WORKDIR.value, arms, list(config.data.mixture.tasks),
                                       higher_is_better=higher)
    print(f"\n{text}\nreport: {out}")


def run() -> None:
    """The ``ftjax-multitask`` console script (``python -m ftjax.commands.multitask``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
