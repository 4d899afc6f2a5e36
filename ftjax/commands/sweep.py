"""Run every arm of a config's sweep(), then write results.csv, report.md and plots.

ftjax-sweep --config=NAME|FILE.py[:ARG] --workdir=DIR [--parallel=N]
    [--devices_per_arm=K] [--launcher=ray --ray_address=HOST:PORT --max_retries=3]
    [--fuse=auto|off|max_arms=N]

--fuse=auto (the default, local launcher) trains arms that differ only in traced values (lr,
weight decay, seed, LoRA alpha/rank) as one vmapped program per group, as many per program as
the memory estimate fits; max_arms=N caps a group (refused if N don't fit); off runs each alone.

SIGTERM or Ctrl-C stops every running arm at a checkpoint and exits non-zero naming them;
the same command again resumes them. See docs/scale_ray.md for sweeps on a Ray cluster.
A config with ``study(workdir, arms, config) -> (path, text)`` also gets that report after the
sweep's own (configs/scaling.py: scaling.md, the fit of the metric against log2 train rows).
With --search (the default for a config with search() but no sweep()) it runs the config's
Optuna search instead: --parallel trials at a time, report in search_report.md (docs/search.md).
"""

from absl import flags

from ftjax import cli
from ftjax.errors import require

_CONFIG = flags.DEFINE_string("config", None, "Config file (or the name of a shipped config) with sweep().")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: arms/, results.csv, report.md.")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "ray"],
                              "Where arms run: local processes, or Ray tasks on a cluster.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Local: arms run at the same time.")
_DEVICES = flags.DEFINE_integer("devices_per_arm", 0, "Local: accelerators each arm gets "
                                "(CUDA_VISIBLE_DEVICES / TPU_VISIBLE_CHIPS); 0 = all of them.")
_RAY_ADDRESS = flags.DEFINE_string("ray_address", None, "Ray: the cluster's HOST:PORT (default: "
                                   "start a local Ray instance).")
_MAX_RETRIES = flags.DEFINE_integer("max_retries", 3, "Ray: times an arm whose node died is retried.")
_RETRY = flags.DEFINE_bool("retry_failed", False, "Run failed arms again.")
_FUSE = flags.DEFINE_string("fuse", "auto", "auto | off | max_arms=N: train arms that compile to "
                             "one program together (local launcher).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only (re)write the report.")
_SEARCH = flags.DEFINE_bool("search", False, "Run the config's search() (Optuna) instead of sweep().")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from ftjax.experiments import report, sweep

    path, _, arg = _CONFIG.value.partition(":")
    module = sweep.load_config_module(path)
    if _SEARCH.value or (hasattr(module, "search") and not hasattr(module, "sweep")):
        return _search(module, arg or None)
    if not hasattr(module, "sweep"):
        raise sweep.SweepError(f"{path} has no sweep() function")
    arms = sweep.expand_arms(module.sweep(arg or None) if module.sweep.__code__.co_argcount
                             else module.sweep(), resources=getattr(module, "RESOURCES", None))
    config = module.get_config(arg or None)
    if not _REPORT_ONLY.value:
        print(f"sweep: {len(arms)} arms -> {_WORKDIR.value} ({_LAUNCHER.value} launcher)", flush=True)
        _launcher(fuse=True).run(arms)
    metric = config.eval.best_metric
    path_md, text = report.write_report(_WORKDIR.value, arms, metric,
                                        higher_is_better=config.eval.best_mode == "max")
    print("\n" + text + f"\nreport: {path_md}")
    if hasattr(module, "study"):  # the config's own study report over the same arms
        path_md, text = module.study(_WORKDIR.value, arms, config)
        print("\n" + text + f"\nstudy report: {path_md}")


def _launcher(fuse: bool = False):
    from ftjax.experiments import launchers
    from ftjax.train.fused_plan import parse_fuse

    return launchers.make_launcher(
        _LAUNCHER.value, _CONFIG.value, _WORKDIR.value, parallel=_PARALLEL.value,
        devices_per_arm=_DEVICES.value, ray_address=_RAY_ADDRESS.value,
        max_retries=_MAX_RETRIES.value, retry_failed=_RETRY.value,
        fuse=parse_fuse(_FUSE.value) if fuse else None)


def _search(module, arg):
    """Run (or with --report_only only report) the config's search(), --parallel trials at a time."""
    optuna = require("optuna", "search", "--search (an Optuna study)")
    from ftjax.experiments import search, search_report

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the driver prints each trial itself
    spec = search.load_spec(module, arg, module.get_config(arg))
    if _REPORT_ONLY.value:
        study = search.open_study(_WORKDIR.value, spec)
    else:
        print(f"search: {spec.trials} trials -> {_WORKDIR.value} ({_LAUNCHER.value} launcher)", flush=True)
        study = search.SearchDriver(_launcher(), _WORKDIR.value, spec, parallel=_PARALLEL.value).run()
    path_md, text = search_report.write_report(_WORKDIR.value, study, spec)
    print("\n" + text + f"\nreport: {path_md}")


def run() -> None:
    """The ``ftjax-sweep`` console script (``python -m ftjax.commands.sweep``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
