"""Few-shot study: meta-train (config.meta), run the config's sweep() arms from the pretrained
and from the meta-learned model, the in-context evaluations at the same k (decoders), then the
learning curve.

ftjax-fewshot --config=fewshot[:ARG] --workdir=DIR [--parallel=N] [--in_process] [--meta=false]

Writes DIR/meta-<algorithm>/ (the meta-learned weights, metrics.jsonl, meta_summary.json),
DIR/report.md (the sweep report), DIR/incontext/k<K>.json, DIR/fewshot.md and
DIR/learning_curve.png. Finished meta-training, arms and in-context results are reused; a second
study in DIR with the other config.meta.algorithm adds its column beside the first.
"""

from absl import flags

from ftjax import cli

_CONFIG = flags.DEFINE_string("config", None, "Config file with sweep() and ks().")
_WORKDIR = flags.DEFINE_string("workdir", None, "Study directory.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Fine-tuning arms run at the same time.")
_IN_PROCESS = flags.DEFINE_bool("in_process", False, "Train the arms one after another in this "
                                "process instead of one process each.")
_META = flags.DEFINE_bool("meta", True, "Meta-train (config.meta) and fine-tune from it too.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from ftjax.experiments import fewshot

    _, text = fewshot.run_study(_CONFIG.value, _WORKDIR.value, meta=_META.value,
                                in_process=_IN_PROCESS.value, parallel=_PARALLEL.value)
    print(f"\n{text}\nreport: {_WORKDIR.value}/fewshot.md")


def run() -> None:
    """The ``ftjax-fewshot`` console script (``python -m ftjax.commands.fewshot``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
