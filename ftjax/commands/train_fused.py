"""Train arms of a config's sweep() as one fused program (the sweep runner starts this).

python -m ftjax.commands.train_fused --config=FILE.py[:ARG] --workdir=SWEEP_DIR --arms=A,B,..
    [--max_arms=N]

Each arm trains in SWEEP_DIR/arms/NAME exactly as ``ftjax-train`` would leave it there.
"""

from absl import flags

from ftjax import cli

_CONFIG = flags.DEFINE_string("config", None, "Config file with sweep() (FILE.py[:ARG]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep directory.")
_ARMS = flags.DEFINE_list("arms", None, "Names of the sweep arms to train together.")
_MAX_ARMS = flags.DEFINE_integer("max_arms", 0, "Arms per fused program; 0 = as many as fit.")
flags.mark_flags_as_required(["config", "workdir", "arms"])


def main(argv):
    del argv
    from ftjax.experiments import sweep
    from ftjax.train.fused_loop import train_in_groups

    arms = sweep.arm_configs(_CONFIG.value, _WORKDIR.value, _ARMS.value)
    train_in_groups([(a.name, c, sweep.arm_dir(_WORKDIR.value, a)) for a, c in arms],
                    max_arms=_MAX_ARMS.value)


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
