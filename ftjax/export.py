"""Export a trained run: ``export_run(workdir, fmt, out)`` -> a Hugging Face folder, a PEFT
adapter folder, or a GGUF file, each with a model card (README.md).

The run is rebuilt from ``workdir/config.json`` and the chosen checkpoint (``load_trained``).
Adapter methods are merged into the base weights for ``hf`` and ``gguf``. What a format can take
is checked before anything is loaded or written (``check_run``, ``check_model``). The files go to
a fresh local folder that replaces ``out`` as a whole once complete, so a failed export leaves
nothing behind and never clobbers an existing ``out``; for an object-store ``out`` (``gs://...``)
the folder is uploaded to a sibling of ``out`` and renamed onto it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from ftjax import hub
from ftjax.config import load_run_config
from ftjax.errors import FtjaxError
from ftjax.model_card import is_model_card, model_card
from ftjax.models import registry
from ftjax.models.gguf_io import ARCH_OF_MODEL_TYPE, EXPORT_DTYPES, write_gguf
from ftjax.paths import as_path, is_url
from ftjax.peft import registry as methods

FORMATS = ("hf", "peft", "gguf")
PEFT_METHODS = tuple(m.name for m in methods.methods() if m.peft is not None)
# Methods that only choose which existing parameters train: the model needs no merging.
PLAIN_METHODS = tuple(m.name for m in methods.methods() if m.plain)
# No merged form (extra modules or virtual tokens).
UNMERGEABLE = tuple(m.name for m in methods.methods() if not (m.plain or m.mergeable))
GGUF_HEAD = "causal_lm"


class ExportError(FtjaxError, ValueError):
    """An export the run cannot make in the requested format, or an ``out`` it must not replace."""


# ---------------------------------------------------------------------------------------------
# What each format takes
# ---------------------------------------------------------------------------------------------

def check_run(config: ml_collections.ConfigDict, fmt: str, workdir: Any,
              gguf_dtype: str = "f32") -> None:
    """Refuse, from the run's config alone, an export its head or method cannot make."""
    kind, head = config.method.kind, config.model.head
    run = f"the run in {workdir} (model {config.model.source!r}, {head} head, method {kind!r})"
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} for {run}; choose from {FORMATS}")
    if fmt == "peft" and kind not in PEFT_METHODS:
        why = ("trains the model's own weights, so there is no adapter to export"
               if kind in PLAIN_METHODS else "has no PEFT format")
        raise ExportError(f"--format=peft cannot export {run}: method {kind!r} {why}; peft takes "
                          f"the adapter methods {', '.join(PEFT_METHODS)}; use --format=hf")
    if fmt != "peft" and kind in UNMERGEABLE:
        fix = "use --format=peft" if kind in PEFT_METHODS else "serve the workdir itself"
        raise ExportError(f"--format={fmt} cannot export {run}: {kind} adapters cannot be merged "
                          f"into the base weights; {fix}")
    if fmt == "gguf" and head != GGUF_HEAD:
        raise ExportError(f"--format=gguf cannot export {run}: gguf takes decoder language models "
                          f"({GGUF_HEAD} head) of model types {', '.join(ARCH_OF_MODEL_TYPE)}; "
                          f"use --format=hf")
    if fmt == "gguf" and gguf_dtype not in EXPORT_DTYPES:
        raise ExportError(f"GGUF tensor type {gguf_dtype!r}; choose from {sorted(EXPORT_DTYPES)}")


def check_model(model: nnx.Module, fmt: str, workdir: Any) -> None:
    """Refuse an export the loaded architecture cannot make (GGUF: llama.cpp's model types)."""
    cfg = model.model.cfg
    if fmt == "gguf" and cfg.model_type not in ARCH_OF_MODEL_TYPE:
        family = registry.family_for_config(cfg).name
        raise ExportError(f"--format=gguf cannot export the run in {workdir}: its model is of the "
                          f"{family} family (model type {cfg.model_type!r}); gguf takes model types "
                          f"{', '.join(ARCH_OF_MODEL_TYPE)}; use --format=hf")


def _check_out(out: epath.Path) -> None:
    """``out`` must be new, an empty folder or an earlier export: an export replaces it whole."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    card = out / "README.md"
    if not (out.is_dir() and card.is_file() and is_model_card(card.read_text())):
        raise ExportError(f"--out={out} exists and is not an earlier export (it has no ftjax model "
                          f"card); an export replaces its --out as a whole, so pass a new path or "
                          f"remove it first")


# ---------------------------------------------------------------------------------------------
# Writing: a local folder, moved onto ``out`` whole
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _staged(out: epath.Path) -> Iterator[Path]:
    """A fresh local folder for the export's files; when the block succeeds it replaces ``out``."""
    # Locally the folder sits in ``out``'s nearest existing ancestor, so the move is a rename.
    near = tempfile.gettempdir() if is_url(out) else next(p for p in out.parents if p.exists())
    folder = Path(near) / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        yield folder
        _replace(_upload(folder, out.parent / folder.name) if is_url(out) else epath.Path(folder),
                 out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _upload(folder: Path, dst: epath.Path) -> epath.Path:
    """Copy the local ``folder`` to ``dst`` on an object store (nothing is left there on failure)."""
    try:
        for src in sorted(folder.rglob("*")):
            if src.is_file():
                target = dst / src.relative_to(folder).as_posix()
                with src.open("rb") as f, target.open("wb") as g:
                    shutil.copyfileobj(f, g, 1 << 24)
    except BaseException:
        if dst.exists():
            dst.rmtree()
        raise
    return dst


def _move(src: epath.Path, dst: epath.Path) -> None:
    """Rename the (flat) export folder ``src`` to ``dst``. On an object store a rename is a copy
    anyway: each object is copied server-side, then ``src`` deleted."""
    if not is_url(src):
        src.rename(dst)
        return
    for f in sorted(src.iterdir()):
        f.copy(dst / f.name)
    src.rmtree()


def _replace(new: epath.Path, out: epath.Path) -> None:
    """Move ``new`` onto ``out``; an existing ``out`` is set aside first and deleted only once
    ``new`` is in place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}" if out.exists() else None
    if old is not None:
        _move(out, old)
    try:
        _move(new, out)
    except BaseException:
        if new.exists():
            new.rmtree()
        if is_url(out) and out.exists():  # half copied
            out.rmtree()
        if old is not None:
            _move(old, out)
        raise
    if old is not None:
        old.rmtree()


def merged_model(model: nnx.Module, method_kind: str) -> nnx.Module:
    """The plain architecture with any adapter folded into its weights (in place)."""
    if method_kind in PLAIN_METHODS:
        return model
    from ftjax.peft import merge_and_unload
    return merge_and_unload(model)


def _write(exp: Any, config: ml_collections.ConfigDict, fmt: str, folder: Path,
           gguf_dtype: str, gguf_pre: str) -> None:
    kind, head = config.method.kind, config.model.head
    if fmt == "hf":
        from ftjax.models.saving import save_pretrained
        labels = exp.pipe.info.label_names if head != "causal_lm" else None
        save_pretrained(merged_model(exp.model, kind), folder, exp.tokenizer, head=head,
                        id2label=dict(enumerate(labels)) if labels else None)
    elif fmt == "peft":
        from ftjax.peft import export_peft
        export_peft(exp.model, config.method, folder, base_model_name_or_path=config.model.source)
    else:
        try:
            save_gguf(merged_model(exp.model, kind), exp.tokenizer,
                      folder / f"model-{gguf_dtype}.gguf", gguf_dtype,
                      source_gguf=source_gguf(config), pre_tokenizer=gguf_pre or None)
        except NotImplementedError as e:  # a feature llama.cpp would silently drop
            raise ExportError(f"--format=gguf cannot export {config.model.source!r}: {e}; "
                              f"use --format=hf") from e


def source_gguf(config: ml_collections.ConfigDict) -> Path | None:
    """The GGUF file the run's tokenizer came from (its metadata is copied), if any."""
    if config.data.tokenizer_file:
        return Path(config.data.tokenizer) / config.data.tokenizer_file
    if not config.data.tokenizer and str(config.model.source).endswith(".gguf"):
        return Path(config.model.source)
    return None


def gguf_tensors(model: nnx.Module) -> Iterator[tuple[str, np.ndarray]]:
    """The causal LM's tensors under transformers names, float32 on the host, one at a time."""
    from ftjax.models.saving import iter_hf_tensors, to_host
    for name, spec, value, layer in iter_hf_tensors(model, GGUF_HEAD):
        yield name, to_host(spec, value, layer, "float32")


def save_gguf(model: nnx.Module, tokenizer: Any, path: str | os.PathLike, dtype: str = "f32", *,
              source_gguf: str | os.PathLike | None = None,
              pre_tokenizer: str | None = None) -> Path:
    """Write a causal LM as a llama.cpp GGUF file (``ftjax.models.gguf_io.write_gguf``)."""
    cfg = model.model.cfg
    hf_config = registry.family_for_config(cfg).to_hf_config(cfg)
    return write_gguf(path, hf_config, gguf_tensors(model), tokenizer, dtype=dtype,
                      source_gguf=source_gguf, pre_tokenizer=pre_tokenizer)


def export_run(workdir: str | os.PathLike, fmt: str, out: str | os.PathLike,
               checkpoint: str = "latest", *, gguf_dtype: str = "f32", gguf_pre: str = "",
               push_to_hub: str | None = None, hub_endpoint: str | None = None) -> epath.Path:
    """Write checkpoint ``checkpoint`` of the run in ``workdir`` to the folder ``out`` as ``fmt``
    (a local path or an object-store URL); returns ``out``. ``gguf_pre`` names llama.cpp's
    pre-tokenizer for a tokenizer its table does not know. With ``push_to_hub`` (a Hub repo id)
    the finished folder is uploaded there (``hub_endpoint``: another Hub than ``HF_ENDPOINT``)
    before it replaces ``out``, so a failed push leaves ``out`` as it was."""
    from ftjax.train.loop import load_trained

    if push_to_hub:
        hub.check_push(push_to_hub)
    workdir, out = as_path(workdir), as_path(out)
    config = load_run_config(workdir)
    check_run(config, fmt, workdir, gguf_dtype)
    _check_out(out)
    exp, step = load_trained(config, workdir, checkpoint)
    check_model(exp.model, fmt, workdir)
    with _staged(out) as folder:
        _write(exp, config, fmt, folder, gguf_dtype, gguf_pre)
        files = sorted(p.name for p in folder.iterdir())
        model_card(config, workdir, fmt=fmt, step=step, files=files).save(folder / "README.md")
        if push_to_hub and jax.process_index() == 0:  # one upload, not one per host
            hub.push_to_hub(folder, push_to_hub, endpoint=hub_endpoint,
                            message=f"ftjax {fmt} export of {workdir.name}, step {step}")
    return out
