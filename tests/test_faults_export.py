"""Exports that cannot or do not finish: a format the run's head or method does not fit is refused
before anything is written (scripts/export.py prints one line), and a failure while writing
leaves no partial folder and keeps an existing export as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from object_store import gcs, gcs_server  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    """A tiny-bert SST-2 classifier trained (all weights) for one step, without an eval split."""
    from ftjax.configs.tiny import get_config
    from ftjax.data import presets
    from ftjax.train.loop import train
    config = get_config("steps=1")
    config.model.source = "tiny-bert"
    config.model.head = "sequence_classification"
    presets.sst2(config.data, task="classification")
    config.data.eval_path = ""
    config.data.seq_len = 32
    config.train.batch_size = 8
    config.mesh.num_devices = 1
    config.checkpoint.async_save = False
    workdir = tmp_path_factory.mktemp("bert_run")
    train(config, workdir)
    return workdir


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_gguf_of_a_bert_classifier_is_one_clear_line_and_creates_nothing(bert_run, tmp_path):
    out = tmp_path / "OUT.gguf"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"),
                           f"--workdir={bert_run}", "--format=gguf", f"--out={out}"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stderr.splitlines() if "--format=gguf" in ln]
    for part in ("'tiny-bert'", "sequence_classification head", "causal_lm", "llama", "qwen2",
                 "--format=hf"):
        assert part in line, line
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary sibling


def test_peft_of_a_full_run_is_refused_and_creates_nothing(bert_run, tmp_path):
    from ftjax.export import ExportError, export_run
    with pytest.raises(ExportError, match=r"method 'full' trains the model's own weights, so there "
                                          r"is no adapter.*lora.*--format=hf"):
        export_run(bert_run, "peft", tmp_path / "peft")
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_is_not_an_export_is_refused_untouched(bert_run, tmp_path):
    from ftjax.export import ExportError, export_run
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match="exists and is not an earlier export"):
        export_run(bert_run, "hf", out)
    assert _tree(out) == {"todo.txt": b"keep me"} and list(tmp_path.iterdir()) == [out]


def test_a_failed_export_keeps_the_earlier_one_and_a_good_one_replaces_it(bert_run, tmp_path,
                                                                          monkeypatch):
    import transformers

    from ftjax.export import export_run
    from ftjax.models import saving
    out = tmp_path / "hf"
    out.mkdir()  # an earlier export, as far as its model card goes
    (out / "README.md").write_text("---\nlibrary_name: transformers\nbase_model: tiny-bert\n"
                                   "tags: [ftjax, full, classification]\n---\n\n# old\n")
    (out / "model.safetensors").write_bytes(b"the earlier weights")
    before = _tree(out)

    real_save = saving.save_pretrained

    def save_then_fail(model, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half a shard")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export_run(bert_run, "hf", out)
    assert _tree(out) == before
    assert list(tmp_path.iterdir()) == [out]  # no partial or set-aside sibling

    monkeypatch.setattr(saving, "save_pretrained", real_save)
    export_run(bert_run, "hf", out)
    assert list(tmp_path.iterdir()) == [out]
    assert "# old" not in (out / "README.md").read_text()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_an_object_store_out_appears_whole_or_not_at_all(gcs):
    """The same publishing on gs:// (emulated): the earlier export stays until a new one is
    complete, then only the new files remain."""
    from etils import epath

    from ftjax.export import _staged
    out = epath.Path(gcs.url("exports", "hf"))
    (out / "README.md").write_text("---\ntags: [ftjax, full, classification]\n---\n# old\n")
    (out / "model.safetensors").write_bytes(b"the earlier weights")
    with pytest.raises(OSError, match="No space left"), _staged(out) as folder:
        (folder / "model.safetensors").write_bytes(b"half a shard")
        raise OSError(28, "No space left on device")
    assert sorted(gcs.objects()) == ["exports/hf/README.md", "exports/hf/model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"the earlier weights"
    with _staged(out) as folder:
        (folder / "config.json").write_text("{}")
        (folder / "README.md").write_text("---\ntags: [ftjax, lora, lm]\n---\n# new\n")
    assert sorted(gcs.objects()) == ["exports/hf/README.md", "exports/hf/config.json"]
    assert (out / "README.md").read_text().endswith("# new\n")
