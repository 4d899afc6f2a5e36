"""Run every arm of a config's sweep(), then write results.csv, report.md and plots.

python scripts/sweep.py --config=configs/NAME.py[:ARG] --workdir=DIR [--parallel=N]
"""

from absl import app, flags

from ftjax import cli

_CONFIG = flags.DEFINE_string("config", None, "Config file (or a name in configs/) with sweep().")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: arms/, results.csv, report.md.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Arms run at the same time.")
_RETRY = flags.DEFINE_bool("retry_failed", False, "Run failed arms again.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only (re)write the report.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from ftjax.experiments import report, sweep

    path, _, arg = _CONFIG.value.partition(":")
    module = sweep.load_config_module(path)
    if not hasattr(module, "sweep"):
        raise app.UsageError(f"{path} has no sweep() function")
    arms = sweep.expand_arms(module.sweep(arg or None) if module.sweep.__code__.co_argcount
                             else module.sweep())
    config = module.get_config(arg or None)
    if not _REPORT_ONLY.value:
        print(f"sweep: {len(arms)} arms -> {_WORKDIR.value} ({_PARALLEL.value} at a time)", flush=True)
        sweep.SweepRunner(_CONFIG.value, _WORKDIR.value, parallel=_PARALLEL.value,
                          retry_failed=_RETRY.value).run(arms)
    metric = config.eval.best_metric
    path_md, text = report.write_report(_WORKDIR.value, arms, metric,
                                        higher_is_better=config.eval.best_mode == "max")
    print("\n" + text + f"\nreport: {path_md}")


if __name__ == "__main__":
    cli.run(main)
