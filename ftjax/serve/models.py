"""What a server serves: a causal LM (generation) or a sequence classifier, from any source.

A source is a training workdir (``config.json`` + ``checkpoints/``: the run is rebuilt and its
checkpoint restored), a Hugging Face export folder, a ``.gguf`` file, a hub id or a preset.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import ml_collections

from ftjax.generate import Generator
from ftjax.models.loading import from_pretrained, load_tokenizer
from ftjax.serve.batching import BatchQueue
from ftjax.serve.classify import Classifier

SERVABLE_HEADS = ("causal_lm", "sequence_classification")


@dataclasses.dataclass
class ServedModel:
    """One model id of the API; exactly one of ``queue`` (generation) and ``classifier`` is set."""
    name: str
    queue: BatchQueue | None = None
    classifier: Classifier | None = None

    @property
    def generator(self) -> Generator | None:
        return self.queue.generator if self.queue else None


def is_workdir(path: Path) -> bool:
    return (path / "checkpoints").is_dir() and (path / "config.json").is_file()


def workdir_config(workdir: Path) -> ml_collections.ConfigDict:
    """The run's config, rebuilt from the ``config.json`` the training loop wrote."""
    return ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))


def _hf_head(path: Path) -> tuple[str, list[str]]:
    """(head, label names) of a Hugging Face folder, from its ``architectures``/``id2label``."""
    d = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    arch = (d.get("architectures") or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        id2label = d.get("id2label") or {}
        return "sequence_classification", [id2label[k] for k in sorted(id2label, key=int)]
    if arch.endswith("ForTokenClassification"):
        raise ValueError(f"{path}: token classification models are not servable "
                         f"(heads: {SERVABLE_HEADS})")
    return "causal_lm", []


def _load(source: str, checkpoint: str, tokenizer: str | None) -> tuple[Any, Any, str, list[str]]:
    """(model, tokenizer, head, label names)."""
    path = Path(source)
    if is_workdir(path):
        from ftjax.train.loop import load_trained
        config = workdir_config(path)
        exp, _ = load_trained(config, path, checkpoint)
        labels = list(exp.pipe.info.label_names) if config.model.head != "causal_lm" else []
        return exp.model, exp.tokenizer, config.model.head, labels
    head, labels = _hf_head(path) if path.is_dir() else ("causal_lm", [])
    model, tok = from_pretrained(source, head=head, num_labels=len(labels))
    tok = load_tokenizer(Path(tokenizer)) if tokenizer else tok
    if tok is None:
        raise ValueError(f"{source} has no tokenizer; pass --tokenizer=FOLDER")
    return model, tok, head, labels


def load_served(source: str, *, checkpoint: str = "latest", tokenizer: str | None = None,
                max_batch: int = 8) -> ServedModel:
    """Load ``source`` and wrap it for serving under the id ``Path(source).stem``."""
    model, tok, head, labels = _load(source, checkpoint, tokenizer)
    name = Path(source.rstrip("/")).stem if source.endswith(".gguf") else Path(source.rstrip("/")).name
    if head == "causal_lm":
        return ServedModel(name, queue=BatchQueue(Generator(model, tok, max_batch=max_batch)))
    if head == "sequence_classification":
        return ServedModel(name, classifier=Classifier(
            model, tok, labels or [str(i) for i in range(model.score.out_features)],
            max_len=model.model.cfg.max_position_embeddings, max_batch=max_batch))
    raise ValueError(f"head {head!r} is not servable (heads: {SERVABLE_HEADS})")
