"""What a server serves: a causal LM (generation) or a sequence classifier, from any source.

A source is a training workdir (``config.json`` + ``checkpoints/``: the run is rebuilt and its
checkpoint restored), a Hugging Face export folder, a ``.gguf`` file, a hub id or a preset.
A causal LM may carry LoRA-family adapters (training run dirs or PEFT folders), all served over
its one copy of the base weights (``multi_lora``); each adapter is a model id of its own.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from flax import nnx

from ftjax.config import load_run_config
from ftjax.generate import Generator
from ftjax.models.loading import from_pretrained, load_tokenizer
from ftjax.serve import multi_lora
from ftjax.serve.batching import BatchQueue
from ftjax.serve.classify import Classifier
from ftjax.serve.continuous import ContinuousBatcher

SERVABLE_HEADS = ("causal_lm", "sequence_classification")
BATCHING = ("continuous", "static")
LORA_FAMILY = ("lora", "dora")  # adapters that can share a float base model


@dataclasses.dataclass
class ServedModel:
    """One model id of the API; exactly one of ``queue`` (generation) and ``classifier`` is set.

    Adapters of one base share its ``queue``; ``adapter`` is the row index they decode with.
    """
    name: str
    queue: BatchQueue | ContinuousBatcher | None = None
    classifier: Classifier | None = None
    adapter: int = 0

    @property
    def generator(self) -> Generator | None:
        return self.queue.generator if self.queue else None


def is_workdir(path: Path) -> bool:
    return (path / "checkpoints").is_dir() and (path / "config.json").is_file()


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
        config = load_run_config(path)
        exp, _ = load_trained(config, path, checkpoint)
        labels = list(exp.pipe.info.label_names) if config.model.head != "causal_lm" else []
        return exp.model, exp.tokenizer, config.model.head, labels
    head, labels = _hf_head(path) if path.is_dir() else ("causal_lm", [])
    model, tok = from_pretrained(source, head=head, num_labels=len(labels))
    tok = load_tokenizer(Path(tokenizer)) if tokenizer else tok
    if tok is None:
        raise ValueError(f"{source} has no tokenizer; pass --tokenizer=FOLDER")
    return model, tok, head, labels


def model_name(source: str) -> str:
    """The API id of a source: its folder or file name (a ``.gguf`` without the suffix)."""
    path = Path(source.rstrip("/"))
    return path.stem if source.endswith(".gguf") else path.name


def load_served(source: str, *, checkpoint: str = "latest", tokenizer: str | None = None,
                max_batch: int = 8, batching: str = "continuous",
                adapters: Mapping[str, str] | None = None, warmup_len: int = 0
                ) -> list[ServedModel]:
    """Load ``source`` (and its ``adapters``: id -> run dir or PEFT folder) for serving.

    Returns the base model's id, ``model_name(source)``, then one id per adapter. Causal LMs are
    decoded by a ``ContinuousBatcher`` with ``max_batch`` slots, compiled up front for requests
    of up to ``warmup_len`` tokens (``batching="static"``: the older ``BatchQueue``, which
    cannot serve adapters).
    """
    if batching not in BATCHING:
        raise ValueError(f"batching={batching!r}; choose from {BATCHING}")
    model, tok, head, labels = _load(source, checkpoint, tokenizer)
    name, adapters = model_name(source), dict(adapters or {})
    if adapters and (head != "causal_lm" or batching != "continuous"):
        raise multi_lora.AdapterError(f"{source}: adapters need a causal LM with continuous batching")
    if head == "causal_lm":
        rows = attach_adapters(model, tok, adapters, checkpoint) if adapters else {}
        if name in rows:
            raise multi_lora.AdapterError(f"adapter id {name!r} is also the base model's id; rename it")
        gen = Generator(model, tok, max_batch=max_batch)
        queue = (ContinuousBatcher(gen, slots=max_batch, warmup_len=warmup_len)
                 if batching == "continuous" else BatchQueue(gen))
        return [ServedModel(name, queue=queue)] + [ServedModel(a, queue=queue, adapter=i)
                                                   for a, i in rows.items()]
    if head == "sequence_classification":
        return [ServedModel(name, classifier=Classifier(
            model, tok, labels or [str(i) for i in range(model.score.out_features)],
            max_len=model.model.cfg.max_position_embeddings, max_batch=max_batch))]
    raise ValueError(f"head {head!r} is not servable (heads: {SERVABLE_HEADS})")


def attach_adapters(model: nnx.Module, tokenizer: Any, adapters: Mapping[str, str],
                    checkpoint: str = "latest") -> dict[str, int]:
    """Rewrite ``model`` to serve ``adapters`` (id -> run dir or PEFT folder); id -> row index."""
    weights = {}
    for name, source in adapters.items():
        path = Path(source)
        if is_workdir(path):
            kind = load_run_config(path).method.kind
            if kind not in LORA_FAMILY:
                raise multi_lora.AdapterError(f"adapter {name}: {path} trained method {kind!r}; only "
                                 f"{LORA_FAMILY} adapters can share the base model")
            from ftjax.train.loop import load_trained
            adapted = load_trained(load_run_config(path), path, checkpoint)[0].model
        elif (path / "adapter_config.json").is_file():
            from ftjax.peft import import_peft
            adapted = nnx.clone(model)
            import_peft(adapted, path, tokenizer)
        else:
            raise multi_lora.AdapterError(f"adapter {name}: {source} is neither a training run dir "
                             "(config.json + checkpoints/) nor a PEFT folder (adapter_config.json)")
        weights[name] = multi_lora.lora_weights(adapted, name)
        del adapted
    return multi_lora.attach(model, weights)


def sweep_adapters(sweep_dir: str) -> dict[str, str]:
    """Every finished LoRA-family arm of a sweep (``SWEEP_DIR/arms/NAME``): arm name -> run dir."""
    from ftjax.experiments.sweep import arm_status
    arms = Path(sweep_dir) / "arms"
    if not arms.is_dir():
        raise multi_lora.AdapterError(f"--sweep={sweep_dir}: no arms/ folder (is it a sweep's workdir?)")
    found = {arm.name: str(arm) for arm in sorted(arms.iterdir())
             if is_workdir(arm) and arm_status(arm) == "done"
             and load_run_config(arm).method.kind in LORA_FAMILY}
    if not found:
        raise multi_lora.AdapterError(f"--sweep={sweep_dir}: no finished arm trained {LORA_FAMILY}")
    return found
