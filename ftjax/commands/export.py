"""Export a trained run with a model card.

ftjax-export --workdir=DIR --format=hf|peft|gguf --out=OUT [--checkpoint=latest|best|STEP]
    [--gguf_dtype=f32|f16|bf16|q8_0|q4_0|q4_k] [--gguf_pre=NAME]
    [--push_to_hub=ORG/NAME [--hub_endpoint=URL]]

hf: merged weights as a transformers folder; peft: the adapter as a PEFT folder; gguf:
OUT/model-<dtype>.gguf for llama.cpp, with the tokenizer metadata llama.cpp's own converter
writes (copied from the source GGUF when the model came from one; --gguf_pre names llama.cpp's
pre-tokenizer for a tokenizer its table does not know). The run's config comes from
DIR/config.json. OUT may be a local path or a gs:// (or other epath) URL; it appears only once
complete, replacing an earlier export there. An export the run cannot make is one 'error:' line
(exit code 2) before anything is written.
"""

import jax
from absl import flags

from ftjax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/).")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "peft", "gguf"], "Export format.")
_OUT = flags.DEFINE_string("out", None, "Output folder: a local path or a gs:// URL.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest | best | a step number.")
_GGUF_DTYPE = flags.DEFINE_enum("gguf_dtype", "f32", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k"],
                                "GGUF tensor type of the 2-D weights (norms stay F32).")
_GGUF_PRE = flags.DEFINE_string("gguf_pre", "", "llama.cpp pre-tokenizer name (tokenizer.ggml.pre) "
                                "for a tokenizer llama.cpp's table does not know.")
_PUSH = flags.DEFINE_string("push_to_hub", None, "Also upload the export to this Hub model repo "
                            "(ORG/NAME, created if missing; token: HF_TOKEN or `hf auth login`).")
_HUB_ENDPOINT = flags.DEFINE_string("hub_endpoint", None, "The Hub to push to (default: HF_ENDPOINT, "
                                    "else https://huggingface.co).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    del argv
    from ftjax.export import export_run

    out = export_run(_WORKDIR.value, _FORMAT.value, _OUT.value, _CHECKPOINT.value,
                     gguf_dtype=_GGUF_DTYPE.value, gguf_pre=_GGUF_PRE.value, push_to_hub=_PUSH.value,
                     hub_endpoint=_HUB_ENDPOINT.value)
    if jax.process_index() == 0:
        print(f"wrote {_FORMAT.value} export to {out}: {sorted(p.name for p in out.iterdir())}")
        if _PUSH.value:
            print(f"pushed it to {_PUSH.value}")


def run() -> None:
    """The ``ftjax-export`` console script (``python -m ftjax.commands.export``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
