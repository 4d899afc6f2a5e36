"""LoHa, LoKr, LN tuning, VeRA and OFT against Hugging Face ``peft`` (PyTorch, float32).

Layer level: PEFT's own torch layer around an ``nn.Linear`` and the ftjax wrapper around the same
weights, every adapter tensor randomised on the torch side and copied over by PEFT's name, must
give the same outputs and the same merged weight (and unmerging gives the kernel back). Model level
(tiny random Llama; LN tuning on BERT too, for LayerNorm biases and a trained head): ftjax imports
the folder ``PeftModel.save_pretrained`` wrote and must give PEFT's logits; ftjax's export must load
in ``PeftModel.from_pretrained`` and give ftjax's logits. Each method also starts exactly at the
base model and trains on the 2x4 mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers
from flax import nnx

from ftjax import peft, sharding
from ftjax.config import base_config
from ftjax.models import layers
from ftjax.models.loading import from_pretrained
from ftjax.peft import surgery
from ftjax.peft.loha import LoHaLinear
from ftjax.peft.lokr import LoKrLinear, factorization
from ftjax.peft.oft import OFTLinear
from ftjax.peft.vera import VeRALinear
from ftjax.train import optim
from ftjax.train.step import TrainState, make_train_step

ATOL = 2e-6  # float32, layer outputs of size ~1 (measured <= 5e-7)
IN, OUT = 24, 20


def torch_linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(IN, OUT, bias=True)


def ftjax_linear(lin: torch.nn.Linear) -> layers.Linear:
    out = layers.Linear(IN, OUT, axes=("embed", "mlp"), use_bias=True, rngs=nnx.Rngs(0))
    out.kernel[...] = jnp.asarray(lin.weight.detach().numpy().T)
    out.bias[...] = jnp.asarray(lin.bias.detach().numpy())
    return out


def randomize_adapter(layer: torch.nn.Module, seed: int = 1) -> dict[str, np.ndarray]:
    """Noise on every adapter tensor of a PEFT layer; returns them by PEFT name."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "base_layer" not in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
                out[name.replace(".default", "")] = p.detach().numpy().copy()
    return out


def check_layer(hf_layer: torch.nn.Module, ours, tensors: dict[str, np.ndarray],
                names: dict[str, str] | None = None) -> None:
    """Same outputs, same merged weight; unmerging gives the base kernel back."""
    for name, value in tensors.items():
        var = getattr(ours, (names or {}).get(name, name))
        assert var.shape == value.shape, name
        var[...] = jnp.asarray(value)
    base = np.asarray(ours.kernel[...])
    x = np.random.default_rng(0).standard_normal((3, IN)).astype(np.float32)
    with torch.no_grad():
        expected = hf_layer(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), expected, atol=ATOL, rtol=0)
    hf_layer.merge()
    ours.merge()
    np.testing.assert_allclose(np.asarray(ours.kernel[...]).T, hf_layer.base_layer.weight.detach().numpy(),
                               atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), expected, atol=ATOL, rtol=0)
    ours.unmerge()
    np.testing.assert_allclose(np.asarray(ours.kernel[...]), base, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# layer level
# ---------------------------------------------------------------------------------------------

def test_loha_layer_matches_peft():
    lin = torch_linear()
    cfg = hf_peft.LoHaConfig(r=3, alpha=5)
    hf_layer = hf_peft.tuners.loha.Linear(lin, "default", config=cfg, r=3, alpha=5)
    tensors = randomize_adapter(hf_layer)
    assert sorted(tensors) == ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    check_layer(hf_layer, LoHaLinear(ftjax_linear(lin), rank=3, alpha=5, key=jax.random.key(0)), tensors)


@pytest.mark.parametrize("rank,decompose_both,factor", [(2, False, -1), (8, False, -1),
                                                        (1, True, -1), (2, False, 4)])
def test_lokr_layer_matches_peft(rank, decompose_both, factor):
    """Full and low-rank W2, a low-rank W1 (decompose_both) and a fixed decompose_factor."""
    lin = torch_linear()
    cfg = hf_peft.LoKrConfig(r=rank, alpha=3, decompose_both=decompose_both, decompose_factor=factor)
    hf_layer = hf_peft.tuners.lokr.Linear(lin, "default", config=cfg, r=rank, alpha=3)
    tensors = randomize_adapter(hf_layer)
    ours = LoKrLinear(ftjax_linear(lin), rank=rank, alpha=3, decompose_both=decompose_both,
                      decompose_factor=factor, key=jax.random.key(0))
    check_layer(hf_layer, ours, tensors)


def test_vera_layer_matches_peft():
    """The shared pair is larger than the layer (sliced to its in/out, as PEFT does)."""
    from peft.tuners._buffer_dict import BufferDict
    lin = torch_linear()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, IN + 5, generator=g), torch.randn(OUT + 3, 4, generator=g)
    hf_layer = hf_peft.tuners.vera.Linear(lin, BufferDict({"default": a}), BufferDict({"default": b}),
                                          "default", config=hf_peft.VeraConfig(r=4), r=4)
    tensors = randomize_adapter(hf_layer)
    assert sorted(tensors) == ["vera_lambda_b", "vera_lambda_d"]
    ours = VeRALinear(ftjax_linear(lin), shared=(jnp.asarray(a.numpy()), jnp.asarray(b.numpy())),
                      d_initial=0.1, key=jax.random.key(0))
    check_layer(hf_layer, ours, tensors)


@pytest.mark.parametrize("block,r,neumann,terms", [(6, 0, True, 5), (4, 0, False, 5), (0, 3, True, 3)])
def test_oft_layer_matches_peft(block, r, neumann, terms):
    """Cayley-Neumann (5 and 3 terms) and the exact Cayley transform; blocks given by size or count."""
    lin = torch_linear()
    cfg = hf_peft.OFTConfig(oft_block_size=block, r=r, use_cayley_neumann=neumann,
                            num_cayley_neumann_terms=terms)
    hf_layer = hf_peft.tuners.oft.Linear(lin, "default", config=cfg, r=r)
    tensors = randomize_adapter(hf_layer)
    assert sorted(tensors) == ["oft_R.weight"]
    ours = OFTLinear(ftjax_linear(lin), block_size=block or IN // r, use_cayley_neumann=neumann,
                     num_cayley_neumann_terms=terms, key=jax.random.key(0))
    check_layer(hf_layer, ours, tensors, names={"oft_R.weight": "oft_r"})


def test_lokr_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as hf_factorization
    for dim in (1, 7, 12, 20, 24, 48, 96, 576, 1536):
        for factor in (-1, 2, 4, 5, 8):
            assert factorization(dim, factor) == hf_factorization(dim, factor), (dim, factor)


# ---------------------------------------------------------------------------------------------
# model level: PEFT folder -> ftjax -> PEFT folder, on a tiny random Llama
# ---------------------------------------------------------------------------------------------

MODEL_ATOL = 1e-5  # float32 logits of a 2-layer model, |logits| ~ 1 (measured <= 2e-7)
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, pad_token_id=0)
FAMILIES = {  # name -> (transformers class, config, ftjax head, PEFT task type)
    "llama": (transformers.LlamaForCausalLM,
              dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False),
              "causal_lm", "CAUSAL_LM"),
    "bert": (transformers.BertForSequenceClassification,  # LayerNorm: a scale and a bias
             dict(model_type="bert", num_labels=3, max_position_embeddings=64),
             "sequence_classification", "SEQ_CLS"),
}
TARGETS = ["q_proj", "v_proj", "down_proj"]  # square, narrow (GQA) and wide-input kernels
HF_CONFIGS = {
    "loha": lambda task: hf_peft.LoHaConfig(r=4, alpha=6, target_modules=TARGETS, task_type=task),
    "lokr": lambda task: hf_peft.LoKrConfig(r=2, alpha=3, target_modules=TARGETS, task_type=task),
    "ln_tuning": lambda task: hf_peft.LNTuningConfig(  # PEFT's own Llama norms; BERT has none
        task_type=task, target_modules=["LayerNorm"] if task == "SEQ_CLS" else None),
    "vera": lambda task: hf_peft.VeraConfig(r=4, target_modules=TARGETS, save_projection=True,
                                            task_type=task),
    "oft": lambda task: hf_peft.OFTConfig(oft_block_size=8, r=0, target_modules=TARGETS,
                                          task_type=task),
}
ADAPTER_NAMES = ("hada_", "lokr_", "vera_lambda", "oft_R", "ln_tuning", "modules_to_save")


@pytest.fixture(scope="module")
def hf_bases(tmp_path_factory):
    """family -> saved tiny random base folder, built on first use."""
    folders = {}

    def get(family: str):
        if family not in folders:
            cls, extra, _, _ = FAMILIES[family]
            torch.manual_seed(0)
            folders[family] = tmp_path_factory.mktemp(f"{family}_base")
            cls(transformers.AutoConfig.for_model(**COMMON, **extra)).save_pretrained(folders[family])
        return folders[family]
    return get


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("family,kind", [("llama", k) for k in sorted(HF_CONFIGS)]
                         + [("bert", "ln_tuning")])
def test_peft_folder_round_trip(hf_bases, family, kind, tmp_path):
    cls, _, head, task = FAMILIES[family]
    folder = hf_bases(family)
    ids = np.random.default_rng(0).integers(3, 96, size=(2, 7))
    pm = hf_peft.get_peft_model(cls.from_pretrained(folder), HF_CONFIGS[kind](task)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if any(s in name for s in ADAPTER_NAMES):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "hf")
    expected = hf_logits(pm, ids)

    mesh = sharding.make_mesh({}, devices=jax.devices()[:1])
    model, _ = from_pretrained(folder, head=head, mesh=mesh)
    plan = peft.import_peft(model, tmp_path / "hf")
    got = np.asarray(plan.model(jnp.asarray(ids)))
    assert np.abs(got - hf_logits(cls.from_pretrained(folder), ids)).max() > 0.05  # it did adapt
    np.testing.assert_allclose(got, expected, atol=MODEL_ATOL, rtol=0)

    method_cfg = peft.method_from_peft(pm.peft_config["default"].to_dict(), model)
    peft.export_peft(plan.model, method_cfg, tmp_path / "ours", str(folder))
    reloaded = hf_peft.PeftModel.from_pretrained(cls.from_pretrained(folder), tmp_path / "ours").eval()
    np.testing.assert_allclose(hf_logits(reloaded, ids), got, atol=MODEL_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# training on the 2x4 mesh (the pattern of test_peft_methods)
# ---------------------------------------------------------------------------------------------

T = 16
TRAIN = {"loha": dict(loha=dict(rank=4)), "lokr": dict(lokr=dict(rank=4)), "ln_tuning": {},
         "vera": dict(vera=dict(rank=16)), "oft": dict(oft=dict(block_size=8))}


@pytest.fixture(scope="module")
def tiny_llama_2x4():
    """The base model on the 2x4 mesh, a sharded LM batch and the base model's logits on it."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    model = from_pretrained("tiny-llama", mesh=mesh, vocab_size=256)[0]
    ids = np.random.default_rng(0).integers(3, 200, size=(8, T))
    b = dict(input_ids=ids, segment_ids=np.ones_like(ids), targets=np.roll(ids, -1, axis=1),
             positions=np.broadcast_to(np.arange(T), ids.shape).copy(), loss_mask=np.ones_like(ids))
    b = sharding.shard_batch(b, mesh)
    return model, b, np.asarray(model(b["input_ids"]))


@pytest.mark.parametrize("kind", sorted(TRAIN))
def test_fresh_adapter_is_exact_and_learns_on_a_2x4_mesh(tiny_llama_2x4, kind):
    base, b, before = tiny_llama_2x4
    model = nnx.clone(base)
    m = base_config().method
    m.kind = kind
    for section, values in TRAIN[kind].items():
        m[section].update(values)
    plan = peft.apply_method(model, m)
    np.testing.assert_allclose(np.asarray(plan.model(b["input_ids"])), before, atol=1e-6, rtol=0)

    graphdef, params, frozen = nnx.split(plan.model, plan.trainable, ...)
    trained = nnx.to_flat_state(params)
    if kind == "ln_tuning":  # the norms' own scales: 2 stacked per block and the final one
        assert sorted(p[-2] for p, _ in trained) == ["input_layernorm", "norm", "post_attention_layernorm"]
    else:
        assert all(isinstance(v, surgery.AdapterParam) for _, v in trained)
    tcfg = base_config().train
    tcfg.update(learning_rate=3e-2, warmup_steps=0, schedule="constant", steps=100)
    tx = optim.make_optimizer(tcfg, **plan.optimizer_kwargs())
    state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                         opt_state=tx.init(p), rng=jax.random.key(0)))(params)
    step = jax.jit(make_train_step(graphdef, tx, kind="lm"),
                   out_shardings=(jax.tree.map(lambda x: x.sharding, state), None))
    losses = []
    for _ in range(6):
        state, metrics = step(state, frozen, b)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.02, losses
