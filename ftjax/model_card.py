"""The README.md (model card) written into every export folder: base model, method, data,
training config and the run's evaluation metrics (``eval/metrics.json``, ``eval/incontext.json``).
It is a ``huggingface_hub.ModelCard`` whose metadata the Hub reads: library, base model (a Hub
id only), tags, data set (a Hub one only) and the metric names.
"""

from __future__ import annotations

import json
import os
import re

import ml_collections
from etils import epath
from huggingface_hub import ModelCard, ModelCardData

from ftjax.models.registry import PRESETS
from ftjax.paths import as_path

_LIBRARY = {"hf": "transformers", "peft": "peft", "gguf": "gguf"}
_TAG = "ftjax"  # in every card's tags: how an earlier export is recognised
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def is_model_card(text: str) -> bool:
    """Whether ``text`` is a README.md this module wrote."""
    try:
        tags = ModelCard(text, ignore_metadata_errors=True).data.tags
    except ValueError:  # front matter that is not YAML
        return False
    return _TAG in (tags or [])


def _hub_id(source: str) -> str | None:
    """``source`` when it names a Hub repo (not a local folder, file or ftjax preset)."""
    if source in PRESETS or os.path.exists(source) or not _HUB_ID.fullmatch(source):
        return None
    return source


def _read_json(path: epath.Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _data_source(d: ml_collections.ConfigDict) -> str:
    if d.hf.name:
        return f"Hugging Face dataset `{d.hf.name}`" + (f" (`{d.hf.config}`)" if d.hf.config else "")
    if d.tfds.name:
        return f"TFDS `{d.tfds.name}`"
    return f"train `{d.train_path}`" + (f", eval `{d.eval_path}`" if d.eval_path else "")


def _metrics_section(metrics: dict | None) -> list[str]:
    if not metrics:
        return ["No evaluation was recorded for this run (`eval/metrics.json` is missing)."]
    lines = [f"From `eval/metrics.json` (checkpoint step {metrics.get('step', '?')}):", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"]
    for key in ("per_class", "entity_per_type"):
        if metrics.get(key):
            lines += ["", "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
            lines += [f"| {r['label']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} "
                      f"| {r['support']} |" for r in metrics[key]]
    return lines


def _incontext_section(result: dict | None) -> list[str]:
    if not result:
        return []
    s = result["summary"]
    lines = ["", f"In-context baseline (`eval/incontext.json`): k={result['k']} demonstrations per "
             f"label, {result['num_draws']} draws, {result['num_examples']} examples.", "",
             "| scoring | accuracy | macro F1 |", "|---|---|---|"]
    for prefix, name in (("", "raw"), ("calibrated_", "calibrated")):
        if f"{prefix}accuracy_mean" in s:
            lines.append(f"| {name} | {s[f'{prefix}accuracy_mean']:.4f} ± {s[f'{prefix}accuracy_std']:.4f} "
                         f"| {s[f'{prefix}f1_macro_mean']:.4f} ± {s[f'{prefix}f1_macro_std']:.4f} |")
    return lines


_AUTO_CLASS = {"causal_lm": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification",
               "token_classification": "AutoModelForTokenClassification"}


def _usage(fmt: str, files: list[str], head: str) -> list[str]:
    if fmt == "hf":
        auto = _AUTO_CLASS.get(head, "AutoModel")
        return ["```python", f"from transformers import AutoTokenizer, {auto}",
                "tokenizer = AutoTokenizer.from_pretrained(PATH)",
                f"model = {auto}.from_pretrained(PATH)", "```"]
    if fmt == "peft":
        return ["```python", "from peft import AutoPeftModel", "model = AutoPeftModel.from_pretrained(PATH)", "```"]
    return ["```bash", f"llama-cli -m PATH/{files[0] if files else 'model.gguf'} -p \"...\"", "```"]


def model_card(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, fmt: str,
               step: int, files: list[str]) -> ModelCard:
    """The model card for an export of ``workdir`` at checkpoint ``step`` in format ``fmt``."""
    workdir = as_path(workdir)
    m, d, t = config.model, config.data, config.train
    method = config.method.to_dict()
    metrics = _read_json(workdir / "eval" / "metrics.json")
    incontext = _read_json(workdir / "eval" / "incontext.json")
    labels = list(d.label_names) or list(d.labels)
    data = ModelCardData(
        library_name=_LIBRARY[fmt], base_model=_hub_id(m.source), tags=[_TAG, method["kind"], d.task],
        datasets=[d.hf.name] if _hub_id(d.hf.name or "") else None,
        metrics=sorted(k for k, v in (metrics or {}).items()
                       if isinstance(v, (int, float)) and k != "step") or None)
    lines = ["---", data.to_yaml(), "---", "",
             f"# {workdir.name}", "",
             f"Fine-tuned with ftjax from `{m.source}` ({m.head} head), exported as `{fmt}` "
             f"from checkpoint step {step} of `{workdir}`.", "",
             "## Model", "",
             f"- Base model: `{m.source}`",
             f"- Head: `{m.head}`" + (f", labels: {', '.join(map(str, labels))}" if labels else ""),
             f"- Method: `{method['kind']}`",
             "", "```json", json.dumps(method, indent=2, default=str), "```", "",
             "## Data", "",
             f"- Task: `{d.task}`, sequence length {d.seq_len}",
             f"- Source: {_data_source(d)}"]
    if d.task == "text_to_text":
        lines.append(f"- Prompt template: `{d.prompt_template!r}`, verbalisers: {list(d.verbalizers) or 'label names'}")
    if d.kshot.k:
        lines.append(f"- Few-shot: k={d.kshot.k} examples per label (seed {d.kshot.seed}, draw {d.kshot.draw})")
    lines += ["", "## Training", "",
              f"- {t.steps} steps, batch {t.batch_size} (grad accumulation {t.grad_accum}), "
              f"{t.optimizer} lr {t.learning_rate} ({t.schedule}, warmup {t.warmup_steps}), "
              f"weight decay {t.weight_decay}, seed {t.seed}",
              "", "## Evaluation", ""]
    lines += _metrics_section(metrics) + _incontext_section(incontext)
    lines += ["", "## Files and usage", "", *[f"- `{f}`" for f in files], "", *_usage(fmt, files, m.head), "",
              "## Full config", "", "<details><summary>config.json of the run</summary>", "",
              "```json", config.to_json_best_effort(indent=2), "```", "", "</details>", ""]
    return ModelCard("\n".join(lines))
