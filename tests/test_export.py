"""scripts/export.py on a freshly trained tiny run: the HF folder reloads in transformers with
the same logits, the GGUF file reads back with the gguf package and transformers' GGUF loader,
every folder carries a model card with the run's metrics, and --push_to_hub uploads each export
byte for byte (to a stand-in of the Hub API on 127.0.0.1)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from ftjax.config import load_run_config
from ftjax.models.assets import smollm2_gguf_path
from ftjax.models.gguf_io import load_tokenizer
from tests.hub_standin import StandInHub, folder_files

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub():
    """A stand-in Hub, and the environment an export subprocess pushes to it with (online, a token)."""
    with StandInHub() as standin:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        yield standin, dict(env, HF_TOKEN="hf_standin")


def _push_flags(hub, repo):
    return [f"--push_to_hub={repo}", f"--hub_endpoint={hub[0].url}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """configs/tiny.py for 2 steps with SmolLM2's byte-level BPE tokenizer (GGUF needs BPE)."""
    from ftjax.configs.tiny import get_config
    from ftjax.train.loop import train
    workdir = tmp_path_factory.mktemp("run")
    config = get_config("steps=2")
    tokenizer_dir = workdir.parent / "tokenizer"  # the GGUF's tokenizer, saved once as a fast folder
    load_tokenizer(smollm2_gguf_path()).save_pretrained(tokenizer_dir)
    config.data.tokenizer = str(tokenizer_dir)
    with config.unlocked():
        config.model.overrides.vocab_size = 49152
    config.mesh.num_devices = 1
    config.eval.max_batches = 1
    config.checkpoint.async_save = False
    config.train.batch_size, config.data.seq_len = 4, 32  # tiny.py's 16 x 64: seconds a step at -O0
    train(config, workdir)
    return config, workdir


def _ftjax_logits(workdir, ids):
    from ftjax.train.loop import load_trained
    exp, _ = load_trained(load_run_config(workdir), workdir)
    ones = np.ones_like(ids)
    return np.asarray(exp.model(ids, ones, np.arange(ids.shape[1])[None].repeat(len(ids), 0), ones))


def test_config_round_trips(run):
    config, workdir = run
    assert load_run_config(workdir).to_dict() == config.to_dict()


@pytest.mark.slow
def test_export_hf_and_gguf_reload_with_the_same_logits(run, tmp_path, hub, monkeypatch):
    import huggingface_hub
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _, workdir = run
    from ftjax.export import export_run
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), f"--workdir={workdir}",
                           "--format=hf", f"--out={tmp_path / 'hf'}", *_push_flags(hub, "ftjax-test/tiny-hf")],
                          capture_output=True, text=True, timeout=300, env=hub[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # in-process push
    monkeypatch.setenv("HF_TOKEN", "hf_standin")
    export_run(workdir, "gguf", tmp_path / "gguf", push_to_hub="ftjax-test/tiny-gguf", hub_endpoint=hub[0].url)
    for fmt in ("hf", "gguf"):
        assert hub[0].repos[f"ftjax-test/tiny-{fmt}"] == folder_files(tmp_path / fmt)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = np.asarray([tok(t)["input_ids"][:5] for t in ("a gripping , funny film", "dull , far too long !")])
    ours = _ftjax_logits(workdir, ids)

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=2e-4)

    gguf_file = tmp_path / "gguf" / "model-f32.gguf"
    reader = gguf.GGUFReader(gguf_file)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "blk.1.attn_q.weight", "output_norm.weight"} <= names
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    np.testing.assert_array_equal(np.asarray(embd.data), hf.model.embed_tokens.weight.detach().numpy())
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    with torch.no_grad():
        np.testing.assert_allclose(from_gguf(torch.as_tensor(ids)).logits.numpy(), ours, atol=2e-4, rtol=2e-4)

    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    for fmt in ("hf", "gguf"):
        card = huggingface_hub.ModelCard.load(tmp_path / fmt / "README.md")
        assert card.data.base_model is None  # a preset: randomly initialised, no base model
        assert card.data.library_name == {"hf": "transformers", "gguf": "gguf"}[fmt]
        assert "ftjax" in card.data.tags and "Method: `full`" in card.text
        card = str(card)
        assert f"| loss | {metrics['loss']:.4f} |" in card
        assert "stsa.binary.train" in card


def test_peft_export_of_a_full_run_is_a_clear_error(run, tmp_path):
    from ftjax.export import export_run
    _, workdir = run
    with pytest.raises(ValueError, match="no adapter"):
        export_run(workdir, "peft", tmp_path / "peft")


@pytest.mark.slow
def test_peft_export_of_a_lora_run_loads_in_peft_with_the_same_logits(tmp_path, hub):
    """A LoRA run on a transformers-saved base, exported by scripts/export.py --format=peft, gives
    ftjax's logits when HF peft puts the adapter on that base."""
    import peft
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from ftjax.configs.tiny import get_config
    from ftjax.train.loop import train

    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128)).save_pretrained(base_dir)
    config = get_config("steps=3")
    config.model.source = str(base_dir)
    config.method.kind = "lora"
    config.mesh.num_devices = 1
    config.eval.max_batches = 1
    config.checkpoint.async_save = False
    config.train.batch_size, config.data.seq_len = 4, 32
    workdir = tmp_path / "run"
    train(config, workdir)

    out = tmp_path / "peft"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), f"--workdir={workdir}",
                           "--format=peft", f"--out={out}", *_push_flags(hub, "ftjax-test/tiny-lora")],
                          capture_output=True, text=True, timeout=300, env=hub[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hub[0].repos["ftjax-test/tiny-lora"] == folder_files(out)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir)

    ids = np.asarray([[101, 7592, 2088, 999, 102], [101, 2023, 3185, 2003, 102]])
    ours = _ftjax_logits(workdir, ids)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(ids)).logits.numpy()
        with model.disable_adapter():
            base_logits = model(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(theirs - base_logits).max() > 1e-4  # the trained adapter changes the logits
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    assert "Method: `lora`" in (out / "README.md").read_text()


def test_a_run_saved_before_newer_config_keys_still_loads(tmp_path):
    """A run's config.json from before a key existed (here train.loss_chunk and model.pooling)
    loads with that key's default; every saved value is kept."""
    from ftjax.config import base_config
    saved = base_config().to_dict()
    del saved["train"]["loss_chunk"], saved["model"]["pooling"]
    saved["train"]["steps"] = 7
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = load_run_config(tmp_path)
    assert config.train.loss_chunk == 0 and config.model.pooling == "" and config.train.steps == 7
