"""Checkpoint IO: sources (folder, sharded, hub id, preset, pickle), clear errors, sharded export."""

from __future__ import annotations

import json

import huggingface_hub
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from ftjax.models.loading import CheckpointError, from_pretrained
from ftjax.models.saving import save_pretrained
from test_llama_parity import (ftjax_logits, hf_config, make_hf, one_device_mesh, padded_batch,
                               torch_logits)

CausalLM = transformers.AutoModelForCausalLM


@pytest.fixture()
def llama_dir(tmp_path):
    folder = tmp_path / "llama"
    model = make_hf(CausalLM.from_config, hf_config("llama2"), folder)
    return folder, model


def _rewrite(folder, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(llama_dir):
    folder, _ = llama_dir
    _rewrite(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(folder, mesh=one_device_mesh())


def test_wrong_shape_is_named(llama_dir):
    folder, _ = llama_dir
    _rewrite(folder, lambda t: t.update({"model.norm.weight": np.ones(7, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\(7,\).*\(32,\)"):
        from_pretrained(folder, mesh=one_device_mesh())


def test_unexpected_tensor_is_named_and_buffers_ignored(llama_dir):
    folder, _ = llama_dir
    _rewrite(folder, lambda t: t.update({
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))
    from_pretrained(folder, mesh=one_device_mesh())  # a well-known buffer: fine
    _rewrite(folder, lambda t: t.update({"model.extra.weight": np.ones(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.extra\.weight"):
        from_pretrained(folder, mesh=one_device_mesh())


def test_unsupported_model_type_lists_supported(llama_dir):
    folder, _ = llama_dir
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match=r"'gpt_neox'.*supported.*'llama'.*'mistral'.*'qwen2'"):
        from_pretrained(folder, mesh=one_device_mesh())


def test_pickle_only_folder_refused_unless_allowed(llama_dir, tmp_path):
    folder, ref_model = llama_dir
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    torch.save(ref_model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled.*allow_pickle=True"):
        from_pretrained(pickled, mesh=one_device_mesh())
    model, _ = from_pretrained(pickled, mesh=one_device_mesh(), allow_pickle=True)
    ids, mask = padded_batch()
    keep = mask.astype(bool)
    np.testing.assert_allclose(ftjax_logits(model, ids, mask)[keep],
                               torch_logits(ref_model, ids, mask)[keep], atol=1e-4, rtol=0)


def test_hub_id_downloads_only_safe_files(llama_dir, monkeypatch):
    folder, _ = llama_dir
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _ = from_pretrained("someone/tiny-llama", mesh=one_device_mesh())
    (repo_id, patterns), = calls
    assert repo_id == "someone/tiny-llama" and "*.safetensors" in patterns
    assert not any(p.endswith((".bin", ".py")) for p in patterns)


def test_preset_and_bad_source():
    model, tokenizer = from_pretrained("tiny-llama", mesh=one_device_mesh())
    assert tokenizer is None and model.model.cfg.hidden_size == 64
    with pytest.raises(ValueError, match="not a folder"):
        from_pretrained("no such thing", mesh=one_device_mesh())


def test_classifier_on_causal_lm_checkpoint_gets_fresh_head(llama_dir):
    folder, _ = llama_dir
    model, _ = from_pretrained(folder, head="sequence_classification", num_labels=5,
                               mesh=one_device_mesh())
    ids, mask = padded_batch()
    assert ftjax_logits(model, ids, mask).shape == (3, 5)


def test_sharded_export_loads_everywhere(llama_dir, tmp_path):
    folder, ref_model = llama_dir
    model, _ = from_pretrained(folder, mesh=one_device_mesh())
    out = tmp_path / "sharded"
    save_pretrained(model, out, max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert (out / "generation_config.json").exists()
    ids, mask = padded_batch()
    keep = mask.astype(bool)
    ref = torch_logits(ref_model, ids, mask)[keep]
    reloaded, info = CausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask)[keep], ref, atol=1e-5, rtol=0)
    again, _ = from_pretrained(out, mesh=one_device_mesh())
    np.testing.assert_allclose(ftjax_logits(again, ids, mask)[keep], ref, atol=1e-4, rtol=0)


LLAMA32_1B_CONFIG = {  # published config.json (legacy rope keys, as on the hub)
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "tie_word_embeddings": True, "bos_token_id": 128000,
    "eos_token_id": 128001, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
                                             "low_freq_factor": 1.0, "rope_type": "llama3",
                                             "original_max_position_embeddings": 8192}}
QWEN25_7B_CONFIG = {
    "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "use_sliding_window": False,
    "max_window_layers": 28, "tie_word_embeddings": False, "bos_token_id": 151643,
    "eos_token_id": 151643}


@pytest.mark.parametrize("config,preset", [(LLAMA32_1B_CONFIG, "llama3-1b"),
                                           (QWEN25_7B_CONFIG, "qwen2.5-7b")])
def test_published_configs_map_to_presets(config, preset):
    from ftjax.models import llama, registry
    _, expected = registry.get_preset(preset)
    got = llama.from_hf_config(config)
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "rope_theta", "tie_embeddings", "attention_bias", "sliding_window",
              "qk_norm")
    assert {f: getattr(got, f) for f in fields} == {f: getattr(expected, f) for f in fields}
    assert got.resolved_head_dim == expected.resolved_head_dim
    assert got.rope_scaling_dict == expected.rope_scaling_dict
    assert llama.from_hf_config(llama.to_hf_config(got)) == got


@pytest.mark.parametrize("saved,head", [("BertModel", "sequence_classification"),
                                        ("BertForSequenceClassification", "encoder")])
def test_base_model_prefix_is_added_or_stripped(tmp_path, saved, head):
    """transformers' rule: a bare ``BertModel`` checkpoint loads under a head and vice versa."""
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=37, num_labels=2)
    torch.manual_seed(0)
    ref = getattr(transformers, saved)(cfg).eval()
    ref.save_pretrained(tmp_path)
    model, _ = from_pretrained(tmp_path, head=head, num_labels=2, mesh=one_device_mesh())
    ids = np.array([[2, 5, 7, 9, 4], [3, 8, 6, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    backbone = ref if saved == "BertModel" else ref.bert
    with torch.no_grad():
        want = backbone(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    encoder = model if head == "encoder" else model.model
    got = np.asarray(encoder(ids, mask))
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-5)


@pytest.mark.parametrize("saved,head", [("BertModel", "encoder"), ("BertForMaskedLM", "masked_lm"),
                                        ("BertForSequenceClassification", "sequence_classification"),
                                        ("RobertaForSequenceClassification", "sequence_classification")])
def test_folder_loads_as_its_own_architecture(tmp_path, saved, head):
    """No ``head=``: the checkpoint's ``architectures`` decide, as transformers' Auto classes do
    (a classifier with its own label count); outputs match transformers to 1e-5."""
    kind = "Roberta" if saved.startswith("Roberta") else "Bert"
    cfg = getattr(transformers, f"{kind}Config")(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, num_labels=3, pad_token_id=1 if kind == "Roberta" else 0,
        max_position_embeddings=40)
    torch.manual_seed(0)
    ref = getattr(transformers, saved)(cfg).eval()
    ref.save_pretrained(tmp_path)
    model, _ = from_pretrained(tmp_path, mesh=one_device_mesh())
    assert type(model).head == head
    ids = np.array([[2, 5, 7, 9, 4], [3, 8, 6, 1, 1]])
    mask = (ids != 1).astype(np.int64)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    want = (out.last_hidden_state if head == "encoder" else out.logits).numpy()
    got = np.asarray(model(ids, mask))
    if head == "sequence_classification":
        assert got.shape == (2, 3)
        np.testing.assert_allclose(got, want, atol=1e-5)
    else:
        np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-5)
