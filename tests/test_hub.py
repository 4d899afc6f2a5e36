"""The Hub side of exports: the model card's metadata as the Hub reads it, and a push that lands
byte for byte on a local stand-in of the Hub API (never the real Hub)."""

import json

import huggingface_hub
import pytest
import yaml

from ftjax.configs.tiny import get_config
from ftjax.export import export_run
from ftjax.hub import HubError, push_to_hub
from ftjax.model_card import is_model_card, model_card
from tests.hub_standin import StandInHub, folder_files


@pytest.fixture
def online(monkeypatch):
    """Let huggingface_hub make requests (conftest sets HF_HUB_OFFLINE=1); the tests send them to
    the stand-in on 127.0.0.1 only."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_standin")


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


def test_card_metadata(tmp_path):
    workdir = tmp_path / "sst2_lora"
    (workdir / "eval").mkdir(parents=True)
    (workdir / "eval" / "metrics.json").write_text(json.dumps(
        {"step": 40, "accuracy": 0.75, "f1_macro": 0.7, "per_class": [], "confusion_matrix": [[1]]}))
    config = get_config()
    with config.unlocked():
        config.model.source = "HuggingFaceTB/SmolLM2-135M"
        config.method.kind = "lora"
        config.data.hf.name = "stanfordnlp/sst2"
    card = model_card(config, workdir, fmt="peft", step=40, files=["adapter_model.safetensors"])
    path = tmp_path / "README.md"
    card.save(path)
    meta = _front_matter(path.read_text())
    assert meta == {"library_name": "peft", "base_model": "HuggingFaceTB/SmolLM2-135M",
                    "tags": ["ftjax", "lora", config.data.task], "datasets": ["stanfordnlp/sst2"],
                    "metrics": ["accuracy", "f1_macro"]}
    assert huggingface_hub.ModelCard.load(path).data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert "| accuracy | 0.7500 |" in path.read_text() and is_model_card(path.read_text())

    config.model.source, config.data.hf.name = str(tmp_path), ""  # a local folder is no Hub id
    local = _front_matter(str(model_card(config, workdir, fmt="hf", step=40, files=[])))
    assert "base_model" not in local and "datasets" not in local
    assert local["library_name"] == "transformers"


def test_earlier_cards_are_recognised():
    assert is_model_card("---\ntags: [ftjax, full, classification]\n---\n# old\n")
    assert not is_model_card("---\nlibrary_name: transformers\nbase_model: tiny-bert\n---\n# theirs\n")
    assert not is_model_card("# a README without metadata\n")


def test_push_lands_byte_for_byte(tmp_path, online):
    folder = tmp_path / "export"
    (folder / "nested").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "nested" / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "README.md").write_text("---\nlibrary_name: transformers\ntags:\n- ftjax\n---\n# run\n")
    with StandInHub() as hub:
        url = push_to_hub(folder, "ftjax-test/run", endpoint=hub.url)
        push_to_hub(folder, "ftjax-test/run", endpoint=hub.url)  # the repo exists: pushed again
        assert url == f"{hub.url}/ftjax-test/run"
        assert hub.repos["ftjax-test/run"] == folder_files(folder)
        assert hub.requests.count("POST /api/models/ftjax-test/run/commit/main") == 2


def test_push_refused_before_any_work(tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):  # conftest's offline mode
        export_run(missing, "hf", tmp_path / "out", push_to_hub="ftjax-test/run")
    with pytest.raises(HubError, match="not a Hub repo id"):
        export_run(missing, "hf", tmp_path / "out", push_to_hub="not a repo/x/y")
    assert not (tmp_path / "out").exists()


def test_push_refusal_is_one_line(tmp_path, online):
    (tmp_path / "f.txt").write_text("x")
    with StandInHub() as hub:
        hub.handle = lambda path, body: (401, {"error": "Invalid credentials"})
        with pytest.raises(HubError, match=r"ftjax-test/run: http://127.0.0.1:\d+ refused the upload"):
            push_to_hub(tmp_path, "ftjax-test/run", endpoint=hub.url)
