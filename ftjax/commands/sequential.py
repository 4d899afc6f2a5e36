"""Sequential fine-tuning with an accuracy matrix and transfer numbers.

ftjax-sequential --config=sequential[:ARG] --workdir=DIR [--config.a.b=V ...]

Each stage trains in DIR/stage_<i>_<task> (resumable; finished stages are skipped); DIR gets
report.md, sequential.json and accuracy_matrix.png.
"""

from absl import flags
from ml_collections import config_flags

from ftjax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with config.stages.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the stages and the report.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from ftjax.experiments import sequential
    sequential.run(_CONFIG.value, _WORKDIR.value)


def run() -> None:
    """The ``ftjax-sequential`` console script (``python -m ftjax.commands.sequential``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
