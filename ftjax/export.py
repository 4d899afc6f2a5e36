"""Export a trained run: ``export_run(workdir, fmt, out)`` -> a Hugging Face folder, a PEFT
adapter folder, or a GGUF file, each with a model card (README.md).

The run is rebuilt from ``workdir/config.json`` and the chosen checkpoint (``load_trained``).
Adapter methods are merged into the base weights for ``hf`` and ``gguf``.
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from ftjax.config import load_run_config
from ftjax.model_card import model_card

FORMATS = ("hf", "peft", "gguf")
# Methods that only choose which existing parameters train: the model needs no merging.
PLAIN_METHODS = ("full", "head", "partial", "gradual", "llrd", "bitfit")


def merged_model(model: nnx.Module, method_kind: str) -> nnx.Module:
    """The plain architecture with any adapter folded into its weights (in place)."""
    if method_kind in PLAIN_METHODS:
        return model
    from ftjax.peft import merge_and_unload
    return merge_and_unload(model)


def export_run(workdir: str | Path, fmt: str, out: str | Path, checkpoint: str = "latest", *,
               gguf_dtype: str = "f32") -> Path:
    """Write checkpoint ``checkpoint`` of the run in ``workdir`` to the folder ``out`` as ``fmt``."""
    from ftjax.train.loop import load_trained

    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}; choose from {FORMATS}")
    config = load_run_config(workdir)
    exp, step = load_trained(config, workdir, checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kind = config.method.kind
    if fmt == "hf":
        labels = exp.pipe.info.label_names if config.model.head != "causal_lm" else None
        from ftjax.models.saving import save_pretrained
        save_pretrained(merged_model(exp.model, kind), out, exp.tokenizer, head=config.model.head,
                        id2label=dict(enumerate(labels)) if labels else None)
    elif fmt == "peft":
        if kind in PLAIN_METHODS:
            raise ValueError(f"method {kind!r} trains the model's own weights: there is no adapter to "
                             f"export; use --format=hf")
        from ftjax.peft import export_peft
        export_peft(exp.model, config.method, out, base_model_name_or_path=config.model.source)
    else:
        from ftjax.models.gguf_io import save_gguf
        save_gguf(merged_model(exp.model, kind), exp.tokenizer, out / f"model-{gguf_dtype}.gguf", gguf_dtype)
    files = sorted(p.name for p in out.iterdir() if p.name != "README.md")
    (out / "README.md").write_text(model_card(config, workdir, fmt=fmt, step=step, files=files))
    return out
