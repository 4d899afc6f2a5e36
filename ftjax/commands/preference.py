"""Preference tuning (DPO, IPO, SimPO, ORPO, KTO) or a reward model:
ftjax-preference --config=NAME|FILE.py --workdir=DIR (config.data.task = "preference").

A config with a ``sentiment`` section (configs/dpo_sentiment.py) runs the DPO paper's whole
controlled-sentiment experiment instead (ftjax.experiments.dpo_sentiment)."""

from absl import flags
from ml_collections import config_flags

from ftjax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (or the name of a shipped config).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: metrics, eval, the trained model.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if "sentiment" in _CONFIG.value:
        from ftjax.experiments import dpo_sentiment
        dpo_sentiment.run(_CONFIG.value, _WORKDIR.value)
        return
    from ftjax.preference.train import train
    train(_CONFIG.value, _WORKDIR.value)


def run() -> None:
    """``python -m ftjax.commands.preference``."""
    cli.run(main)


if __name__ == "__main__":
    run()
