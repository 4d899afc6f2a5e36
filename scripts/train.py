"""Train (or resume) a model: python scripts/train.py --config=configs/NAME.py --workdir=DIR."""

from absl import flags
from ml_collections import config_flags

from ftjax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (or a name in configs/).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, eval.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from ftjax.train.loop import train
    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
