"""ftjax adapters vs Hugging Face ``peft`` (PyTorch, float32) on tiny random Llama and BERT models.

For each method: a random base is saved with ``save_pretrained`` and loaded by ftjax; ``peft``
wraps a copy, every adapter weight is randomised (a fresh LoRA would hide a wrong B) and saved
in PEFT's format; ftjax imports that folder and must give the same logits. Then ftjax exports
its adapter and ``PeftModel.from_pretrained`` must reproduce ftjax's logits from that folder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers

from ftjax import peft, sharding
from ftjax.models.loading import from_pretrained

ATOL = 1e-4
N_VIRTUAL = 3
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, pad_token_id=0)
FAMILIES = {  # name -> (transformers class, config, ftjax head, PEFT task type)
    "llama": (transformers.LlamaForCausalLM,
              dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False),
              "causal_lm", "CAUSAL_LM"),
    "bert": (transformers.BertForSequenceClassification,
             dict(model_type="bert", num_labels=3, max_position_embeddings=64),
             "sequence_classification", "SEQ_CLS"),
}
TARGETS = {"llama": dict(lora=["q_proj", "v_proj", "down_proj"], ia3=["k_proj", "v_proj", "down_proj"],
                         ff=["down_proj"]),
           "bert": dict(lora=["query", "value", "intermediate.dense"],
                        ia3=["key", "value", "layer.0.output.dense", "layer.1.output.dense"],
                        ff=["layer.0.output.dense", "layer.1.output.dense"])}


def peft_config(method: str, family: str, task: str):
    t = TARGETS[family]
    if method in ("lora", "rslora", "dora"):
        return hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=t["lora"], task_type=task,
                                  use_rslora=method == "rslora", use_dora=method == "dora")
    if method == "ia3":
        return hf_peft.IA3Config(target_modules=t["ia3"], feedforward_modules=t["ff"], task_type=task)
    if method == "prompt":
        return hf_peft.PromptTuningConfig(num_virtual_tokens=N_VIRTUAL, task_type=task)
    return hf_peft.PrefixTuningConfig(num_virtual_tokens=N_VIRTUAL, task_type=task)


def randomize(module: torch.nn.Module, seed: int, only=None) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if only is None or any(s in name for s in only):
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1.0 + 0.2 * noise if ("norm" in name or "ia3" in name) else 0.2 * noise)


ADAPTER_NAMES = ("lora_", "ia3_", "prompt_encoder", "modules_to_save")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def base(request, tmp_path_factory):
    family = request.param
    cls, extra, head, task = FAMILIES[family]
    cfg = transformers.AutoConfig.for_model(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = cls(cfg)
    randomize(model, 0)
    folder = tmp_path_factory.mktemp(f"{family}_base")
    model.save_pretrained(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 96, size=(2, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0  # right padding: HF numbers positions 0..T-1 regardless of the mask
    return dict(family=family, cls=cls, folder=folder, head=head, task=task,
                ids=np.where(mask == 1, ids, 0), mask=mask)


def hf_logits(model, b, method) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(b["ids"]), attention_mask=torch.tensor(b["mask"])).logits
    out = out.numpy()
    if method == "prompt" and out.ndim == 3:
        out = out[:, N_VIRTUAL:]
    return out


def ftjax_logits(model, b) -> np.ndarray:
    return np.asarray(model(jnp.asarray(b["ids"]), jnp.asarray(b["mask"])))


def valid(x: np.ndarray, b) -> np.ndarray:
    """Logits at real tokens only (LM) or per row (classification)."""
    return x[b["mask"] == 1] if x.ndim == 3 else x


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "ia3", "prompt", "prefix"])
def test_peft_parity(base, method, tmp_path):
    b = base
    if method == "prefix" and b["family"] == "bert":
        # transformers 5's BertForSequenceClassification takes no past_key_values, so peft
        # raises "Model does not support past key values" -- there is no reference to match.
        pytest.skip("HF peft cannot run prefix tuning on BERT with transformers 5")
    mesh = sharding.make_mesh({}, devices=jax.devices()[:1])
    hf_base = b["cls"].from_pretrained(b["folder"]).eval()
    pm = hf_peft.get_peft_model(hf_base, peft_config(method, b["family"], b["task"]))
    randomize(pm, 1, only=ADAPTER_NAMES)
    pm.eval()
    pm.save_pretrained(tmp_path / "hf_adapter")
    expected = hf_logits(pm, b, method)

    model, _ = from_pretrained(b["folder"], head=b["head"], mesh=mesh)
    plan = peft.import_peft(model, tmp_path / "hf_adapter")
    got = ftjax_logits(plan.model, b)
    np.testing.assert_allclose(valid(got, b), valid(expected, b), atol=ATOL, rtol=0)

    # ftjax -> PEFT folder -> peft reproduces ftjax's logits.
    method_cfg = peft.method_from_peft(pm.peft_config["default"].to_dict(), model)
    peft.export_peft(plan.model, method_cfg, tmp_path / "ours", str(b["folder"]))
    reloaded = hf_peft.PeftModel.from_pretrained(b["cls"].from_pretrained(b["folder"]).eval(),
                                                 tmp_path / "ours").eval()
    np.testing.assert_allclose(valid(hf_logits(reloaded, b, method), b), valid(got, b),
                               atol=ATOL, rtol=0)
