"""Check that a causal LM does not reproduce redacted personal data:
``ftjax-check-leakage --model=DIR --originals=FILE [--split=train] [--out=FILE.json]``.

``--model`` is a training workdir, a Hugging Face folder, a .gguf file or a hub id (as
``ftjax-serve`` takes); ``--originals`` is the private file ``config.data.privacy.originals_path``
wrote while preparing. Prints the counts (no values) and writes them as JSON with ``--out``.
"""

import json

from absl import flags

from ftjax import cli

_MODEL = flags.DEFINE_string("model", None, "Training workdir, HF folder, .gguf file or hub id.")
_ORIGINALS = flags.DEFINE_string("originals", None, "config.data.privacy.originals_path of the run.")
_SPLIT = flags.DEFINE_string("split", "train", "Which split's values to probe.")
_MAX_PROBES = flags.DEFINE_integer("max_probes", 0, "Probe only the first N values (0: all).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "For workdirs: latest | best | STEP.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer folder for sources without one.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Prompts decoded together.")
_OUT = flags.DEFINE_string("out", None, "Write the result as JSON here.")
flags.mark_flags_as_required(["model", "originals"])


def main(argv):
    del argv
    from ftjax.eval import leakage
    from ftjax.serve.models import load_served

    probes = leakage.load_probes(_ORIGINALS.value, _SPLIT.value, _MAX_PROBES.value)
    served = load_served(_MODEL.value, checkpoint=_CHECKPOINT.value, tokenizer=_TOKENIZER.value,
                         max_batch=_MAX_BATCH.value, batching="static")[0]
    if served.generator is None:
        raise cli.FlagError(f"--model={_MODEL.value} is a classifier; the leakage check needs a causal LM")
    result = leakage.check(served.generator, probes)
    print(f"{result['reproduced']} of {result['probes']} {_SPLIT.value} values reproduced "
          f"({result['skipped_no_prefix']} skipped: no text before them)")
    for entity, c in result["by_entity"].items():
        print(f"  {entity}: {c.get('reproduced', 0)} / {c['probes']}")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=1)


def run() -> None:
    """The ``ftjax-check-leakage`` console script (``python -m ftjax.commands.check_leakage``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
