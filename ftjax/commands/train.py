"""Train (or resume) a model: ftjax-train --config=NAME|FILE.py --workdir=DIR."""

from absl import flags
from ml_collections import config_flags

from ftjax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (or the name of a shipped config).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, eval.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from ftjax.train.loop import train
    train(_CONFIG.value, _WORKDIR.value)


def run() -> None:
    """The ``ftjax-train`` console script (``python -m ftjax.commands.train``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
