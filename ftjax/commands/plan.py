"""Plan a run on a target machine before making it (the guide's step 2: model and method for the
infrastructure at hand).

ftjax-plan --config=NAME|FILE.py[:ARG] [--hardware=v5e-8|h100x8|cpu] [--mfu=0.4] [--methods=all]

Prints one table: for every arm of the config's ``sweep()`` (or the config alone, or every
registered method with --methods=all), the trainable parameters, memory per device
(``ftjax.train.memory``'s estimate), FLOPs per step (``ftjax.train.flops.step_flops``: trained
weights 6N, frozen weights gradients pass through 4N, forward-only frozen weights 2N, attention),
the time for ``config.train.steps`` at the MFU, and whether it fits the device's memory. Nothing
is loaded: shapes come from the model's config (see ``ftjax.train.planner``). The targets and
their default MFU are in ``ftjax/train/hardware.py``; ``cpu`` measures this machine.
"""

from absl import flags

from ftjax import cli

_CONFIG = flags.DEFINE_string("config", None, "Config file (or the name of a shipped config).")
_HARDWARE = flags.DEFINE_string("hardware", "cpu", "v5e-8 | h100x8 | cpu (this machine, measured).")
_MFU = flags.DEFINE_float("mfu", None, "Model-FLOPs utilisation (default: the target's own).")
_METHODS = flags.DEFINE_string("methods", "", "'all': one row per registered method instead of "
                               "the config's sweep arms; or a comma-separated list of methods.")
flags.mark_flags_as_required(["config"])


def _arms(config_arg: str, methods: str) -> list:
    from ftjax.experiments import sweep
    from ftjax.peft import registry
    from ftjax.train.fused_plan import with_overrides

    path, _, arg = config_arg.partition(":")
    module = sweep.load_config_module(path)
    config = module.get_config(arg or None)
    if methods:
        names = registry.names() if methods == "all" else [m.strip() for m in methods.split(",")]
        unknown = [n for n in names if n not in registry.names()]
        if unknown:
            raise cli.FlagError(f"--methods={methods}: {', '.join(unknown)} is not a registered "
                                f"method; choose from all, {', '.join(registry.names())}")
        return [(name, with_overrides(config, {"method.kind": name})) for name in names]
    if hasattr(module, "sweep"):
        return [(arm.name, c) for arm, c in sweep.arm_configs(config_arg, "plan")]
    return [(path, config)]


def main(argv):
    del argv
    from ftjax.train import hardware, planner

    arms = _arms(_CONFIG.value, _METHODS.value)
    dtype = arms[0][1].model.dtype
    if _HARDWARE.value == "cpu":
        print("measuring this machine's matmul throughput (~1 s)", flush=True)
    hw = hardware.get(_HARDWARE.value, dtype)
    mfu = _MFU.value if _MFU.value is not None else hw.mfu
    if not 0 < mfu <= 1:
        raise cli.FlagError(f"--mfu={mfu} must be in (0, 1]")
    rows = planner.plan(arms, hw, mfu, say=lambda s: print(s, flush=True))
    print(planner.format_table(rows, hw, mfu, arms[0][1].train.steps, dtype))


def run() -> None:
    """The ``ftjax-plan`` console script (``python -m ftjax.commands.plan``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
