"""LoRA+ and the LoRA initialisations (gaussian, PiSSA, PiSSA with a randomised SVD, OLoRA) against
Hugging Face ``peft`` 0.21 (PyTorch, float32).

LoRA+: the same tiny Llama, DoRA/LoRA weights and batch; three AdamW steps in ftjax and with
PEFT's ``create_loraplus_optimizer`` give the same adapter. Inits: PEFT's own torch layer and the
ftjax wrapper on the same weights give the same adjusted base weight, the same ``B A`` (``A``, ``B``
up to the sign of each rank component, which an SVD/QR leaves free) and unchanged outputs; on the
tiny Llama the model starts at the base model's logits (PEFT's too), and a trained PiSSA/OLoRA
adapter exports as a LoRA PEFT loads on the *original* base, as a merged HF model transformers
loads, and imports back, all with ftjax's logits; a PiSSA adapter PEFT saved unconverted imports
into ftjax on the original base with PEFT's logits. Each init trains with LoRA+ on the 2x4 mesh.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft as hf_peft
import pytest
import torch
import transformers
from flax import nnx
from peft.optimizers import create_loraplus_optimizer
from safetensors.numpy import load_file
from test_peft_zoo import (IN, MODEL_ATOL, OUT, hf_bases, hf_logits, tiny_llama_2x4,  # noqa: F401
                           torch_linear)

from ftjax import peft, sharding
from ftjax.config import base_config
from ftjax.models import layers
from ftjax.models.loading import from_pretrained
from ftjax.models.saving import save_pretrained
from ftjax.peft.lora import LoRALinear
from ftjax.peft.loraplus import fast
from ftjax.train import optim
from ftjax.train.step import TrainState, make_train_step

RANK, ALPHA = 4, 6.0
TARGETS = r"(q_proj|v_proj|down_proj)$"  # square, narrow (GQA) and wide-input kernels
HF_TARGETS = ["q_proj", "v_proj", "down_proj"]
LLAMA = transformers.LlamaForCausalLM
LAYER_ATOL = 5e-6  # float32 layer weights/outputs of size ~1, two LAPACK SVD/QRs (measured in report)


def method(init: str = "true", ratio: float = 0.0, kind: str = "lora"):
    m = base_config().method
    m.kind = kind
    m.lora.update(rank=RANK, alpha=ALPHA, targets=TARGETS, init=init, plus_ratio=ratio)
    return m


def one_device(folder):
    return from_pretrained(folder, head="causal_lm", mesh=sharding.make_mesh({}, devices=jax.devices()[:1]))[0]


def logits(model, ids) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids)))


def ftjax_linear(lin: torch.nn.Linear) -> layers.Linear:
    out = layers.Linear(lin.in_features, lin.out_features, axes=("embed", "mlp"), use_bias=True,
                        rngs=nnx.Rngs(0))
    out.kernel[...] = jnp.asarray(lin.weight.detach().numpy().T)
    out.bias[...] = jnp.asarray(lin.bias.detach().numpy())
    return out


def align(ours: np.ndarray, theirs: np.ndarray, axis: int) -> np.ndarray:
    """Per rank component (along ``axis``) the sign that best matches ``theirs`` (+-1)."""
    other = tuple(i for i in range(ours.ndim) if i != axis % ours.ndim)
    return np.sign(np.sum(ours * theirs, axis=other, keepdims=True))


# ---------------------------------------------------------------------------------------------
# layer level: PEFT's lora.Linear and ftjax's LoRALinear on the same nn.Linear
# ---------------------------------------------------------------------------------------------

def low_rank_linear(rank: int) -> torch.nn.Linear:
    """An exactly rank-``rank`` weight (well separated singular values): a randomised SVD finds it."""
    lin = torch_linear()
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(OUT, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(IN, rank, generator=g))[0]
    with torch.no_grad():
        lin.weight.copy_(u @ torch.diag(torch.tensor([3.0, 2.0, 1.5, 1.0][:rank])) @ v.T)
    return lin


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_init_layer_matches_peft(init):
    lin = low_rank_linear(RANK) if "niter" in init else torch_linear()
    x = np.random.default_rng(0).standard_normal((3, IN)).astype(np.float32)
    with torch.no_grad():
        before = lin(torch.tensor(x)).numpy()
    ours = LoRALinear(ftjax_linear(lin), rank=RANK, alpha=ALPHA, init=init, key=jax.random.key(0))
    hf = hf_peft.tuners.lora.Linear(lin, "default", config=hf_peft.LoraConfig(init_lora_weights=init),
                                    r=RANK, lora_alpha=ALPHA)  # moves W's part into A, B in place
    a_p, b_p = hf.lora_A["default"].weight.detach().numpy(), hf.lora_B["default"].weight.detach().numpy()
    s = ALPHA / RANK
    np.testing.assert_allclose(np.asarray(ours.kernel[...]).T, hf.base_layer.weight.detach().numpy(),
                               atol=LAYER_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(ours.delta()).T, s * b_p @ a_p, atol=LAYER_ATOL, rtol=0)
    a, b = np.asarray(ours.lora_a[...]), np.asarray(ours.lora_b[...])
    sign = align(a, a_p.T, axis=-1)
    np.testing.assert_allclose(a * sign, a_p.T, atol=LAYER_ATOL, rtol=0)
    np.testing.assert_allclose(b * sign.T, b_p.T, atol=LAYER_ATOL, rtol=0)
    assert np.abs(ours.delta()).max() > 0.05  # the adapter holds a real part of W
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.tensor(x)).numpy(), before, atol=LAYER_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), before, atol=LAYER_ATOL, rtol=0)


def test_gaussian_init_matches_peft_distribution():
    """PEFT draws A ~ N(0, (1/r)^2) and B = 0 (random: compared in distribution, 5120 draws)."""
    wide = torch.nn.Linear(1280, OUT)
    ours = LoRALinear(ftjax_linear(wide), rank=RANK, alpha=ALPHA, init="gaussian", key=jax.random.key(0))
    hf = hf_peft.tuners.lora.Linear(wide, "default", config=hf_peft.LoraConfig(init_lora_weights="gaussian"),
                                    r=RANK, lora_alpha=ALPHA)
    theirs = hf.lora_A["default"].weight.detach().numpy()
    a = np.asarray(ours.lora_a[...])
    for sample in (a, theirs):
        assert abs(sample.std() - 1 / RANK) < 0.04 / RANK and abs(sample.mean()) < 0.02
    assert not np.asarray(ours.lora_b[...]).any() and not hf.lora_B["default"].weight.detach().numpy().any()
    np.testing.assert_array_equal(np.asarray(ours.kernel[...]).T, wide.weight.detach().numpy())


# ---------------------------------------------------------------------------------------------
# model level on a tiny random Llama: start, PEFT export on the original base, merged export
# ---------------------------------------------------------------------------------------------

def perturb_adapter(model, seed: int) -> None:
    """Stand-in for training: noise on every A and B."""
    rng = np.random.default_rng(seed)
    for _, lin in peft.wrapped_linears(model):
        for var in (lin.lora_a, lin.lora_b):
            v = np.asarray(var[...])
            var[...] = jnp.asarray(v + 0.2 * rng.standard_normal(v.shape).astype(np.float32))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_model_starts_unchanged_and_exports_on_the_original_base(hf_bases, init, tmp_path):
    folder = hf_bases("llama")
    ids = np.random.default_rng(0).integers(3, 96, size=(2, 7))
    base_logits = hf_logits(LLAMA.from_pretrained(folder), ids)
    pm = hf_peft.get_peft_model(LLAMA.from_pretrained(folder), hf_peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=HF_TARGETS, init_lora_weights=init)).eval()
    m = method(init)
    model = one_device(folder)
    plan = peft.apply_method(model, m)
    start = logits(plan.model, ids)
    np.testing.assert_allclose(start, base_logits, atol=MODEL_ATOL, rtol=0)
    np.testing.assert_allclose(hf_logits(pm, ids), base_logits, atol=MODEL_ATOL, rtol=0)
    hf_state = {k: v.detach().numpy() for k, v in pm.state_dict().items()}
    for path, lin in peft.wrapped_linears(plan.model):
        for i in range(2):  # the residual kernel and s B A of each stacked layer
            name = f"base_model.model.model.layers.{i}.{path[-2]}.{path[-1]}"
            np.testing.assert_allclose(np.asarray(lin.kernel[...][i]).T,
                                       hf_state[f"{name}.base_layer.weight"], atol=1e-5, rtol=0)
            np.testing.assert_allclose(
                np.asarray(lin.delta()[i]).T, ALPHA / RANK * hf_state[f"{name}.lora_B.default.weight"]
                @ hf_state[f"{name}.lora_A.default.weight"], atol=1e-5, rtol=0)

    perturb_adapter(plan.model, seed=1)
    trained = logits(plan.model, ids)
    assert np.abs(trained - base_logits).max() > 0.05
    peft.export_peft(plan.model, m, tmp_path / "peft", str(folder))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (2 * RANK, 2 * ALPHA, True)
    reloaded = hf_peft.PeftModel.from_pretrained(LLAMA.from_pretrained(folder), tmp_path / "peft").eval()
    np.testing.assert_allclose(hf_logits(reloaded, ids), trained, atol=MODEL_ATOL, rtol=0)
    back = peft.import_peft(one_device(folder), tmp_path / "peft")
    np.testing.assert_allclose(logits(back.model, ids), trained, atol=MODEL_ATOL, rtol=0)

    save_pretrained(peft.merge_and_unload(plan.model), tmp_path / "hf")
    np.testing.assert_allclose(hf_logits(LLAMA.from_pretrained(tmp_path / "hf"), ids), trained,
                               atol=MODEL_ATOL, rtol=0)


def test_unconverted_pissa_adapter_from_peft_imports_on_the_original_base(hf_bases, tmp_path):
    """PEFT saved the adapter as trained (init_lora_weights='pissa'): loading it reruns PiSSA on
    the base it is loaded onto, in PEFT and in ftjax."""
    folder = hf_bases("llama")
    ids = np.random.default_rng(0).integers(3, 96, size=(2, 7))
    pm = hf_peft.get_peft_model(LLAMA.from_pretrained(folder), hf_peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=HF_TARGETS, init_lora_weights="pissa")).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "hf")
    expected = hf_logits(pm, ids)
    plan = peft.import_peft(one_device(folder), tmp_path / "hf")
    np.testing.assert_allclose(logits(plan.model, ids), expected, atol=MODEL_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# LoRA+: AdamW steps against PEFT's create_loraplus_optimizer
# ---------------------------------------------------------------------------------------------

RATIO, LR, WD, STEPS = 16.0, 1e-2, 0.1, 3
PARAM_ATOL = 1e-5  # float32 adapter weights of size ~0.1-1 after 3 steps (measured in report)


def lm_loss(logits_btv, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits_btv[:, :-1], ids[:, 1:]).mean()


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_loraplus_adamw_steps_match_peft(hf_bases, kind, tmp_path):
    """lora_B (and DoRA's one-dimensional magnitude) at lr * ratio, lora_A at lr, weight decay
    decoupled in both; the adapter is ftjax's, exported to PEFT before the steps."""
    folder = hf_bases("llama")
    ids = np.random.default_rng(0).integers(3, 96, size=(4, 9))
    m = method(ratio=RATIO, kind=kind)
    plan = peft.apply_method(one_device(folder), m)
    perturb_adapter(plan.model, seed=3)
    peft.export_peft(plan.model, m, tmp_path / "start", str(folder))
    pm = hf_peft.PeftModel.from_pretrained(LLAMA.from_pretrained(folder), tmp_path / "start",
                                           is_trainable=True)
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                    loraplus_weight_decay=WD, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(STEPS):
        opt.zero_grad()
        lm_loss_t = torch.nn.functional.cross_entropy(
            pm(input_ids=torch.tensor(ids)).logits[:, :-1].reshape(-1, 96), torch.tensor(ids[:, 1:]).reshape(-1))
        lm_loss_t.backward()
        opt.step()

    tcfg = base_config().train
    tcfg.update(learning_rate=LR, weight_decay=WD, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                schedule="constant", grad_clip=0.0, steps=100)
    tx = optim.make_optimizer(tcfg, **plan.optimizer_kwargs())
    graphdef, params, frozen = nnx.split(plan.model, plan.trainable, ...)
    flat = nnx.to_flat_state(params)
    assert sorted({p[-1] for p, v in flat if fast(p, v)}) == (
        ["lora_b", "magnitude"] if kind == "dora" else ["lora_b"])
    grad = jax.jit(jax.grad(lambda p: lm_loss(nnx.merge(graphdef, p, frozen)(jnp.asarray(ids)), ids)))
    opt_state = tx.init(params)
    for _ in range(STEPS):
        updates, opt_state = tx.update(grad(params), opt_state, params)
        params = optax.apply_updates(params, updates)
    nnx.update(plan.model, params)
    peft.export_peft(plan.model, m, tmp_path / "ours", str(folder))
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    start = load_file(str(tmp_path / "start" / "adapter_model.safetensors"))
    theirs = {k: v.detach().numpy() for k, v in hf_peft.get_peft_model_state_dict(pm).items()}
    assert sorted(ours) == sorted(theirs)
    for name, value in ours.items():
        assert np.abs(value - start[name]).max() > 1e-3, name  # every tensor moved
        np.testing.assert_allclose(value, theirs[name], atol=PARAM_ATOL, rtol=0, err_msg=name)


# ---------------------------------------------------------------------------------------------
# each init with LoRA+ trains on the 2x4 mesh (the pattern of test_peft_zoo)
# ---------------------------------------------------------------------------------------------

def test_inits_start_exact_and_learn_with_loraplus_on_a_2x4_mesh(tiny_llama_2x4):
    base, b, before = tiny_llama_2x4
    steps = []  # (graphdef, jitted step, optimizer): gaussian has LoRA's graph, PiSSA OLoRA's
    for init in ("gaussian", "pissa", "olora"):
        plan = peft.apply_method(nnx.clone(base), method(init, ratio=4.0))
        np.testing.assert_allclose(np.asarray(plan.model(b["input_ids"])), before, atol=1e-5, rtol=0)
        graphdef, params, frozen = nnx.split(plan.model, plan.trainable, ...)
        if not any(g == graphdef for g, _, _ in steps):
            tcfg = base_config().train
            tcfg.update(learning_rate=1e-2, warmup_steps=0, schedule="constant", steps=100)
            tx = optim.make_optimizer(tcfg, **plan.optimizer_kwargs())
            steps.append((graphdef, jax.jit(make_train_step(graphdef, tx, kind="lm")), tx))
        step, tx = next((f, t) for g, f, t in steps if g == graphdef)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           rng=jax.random.key(0))
        losses = []
        for _ in range(4):
            state, metrics = step(state, frozen, b)
            losses.append(float(metrics["loss"]))
        assert losses[-1] < losses[0] - 0.02, (init, losses)
    assert len(steps) == 2


# ---------------------------------------------------------------------------------------------
# config: bad values, resume, fusing
# ---------------------------------------------------------------------------------------------

def test_bad_lora_variant_config_is_one_clear_error(hf_bases):
    model = one_device(hf_bases("llama"))
    cases = [(method("pisa"), "config.method.lora.init='pisa'; choose from"),
             (method("pissa", kind="qlora"), "changes the base weight, which qlora stores quantised"),
             (method(ratio=-1.0), "config.method.lora.plus_ratio=-1.0 must be >= 0")]
    m = method("olora")
    m.lora.rank = 20  # > min(in, out) = 16 of the GQA v_proj (q_proj, down_proj: 32)
    cases.append((m, "config.method.lora.rank=20 exceeds min(in, out)=16"))
    for m, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            peft.apply_method(nnx.clone(model), m)


def test_pissa_arms_of_another_rank_do_not_fuse_and_plus_ratio_may_change_on_resume():
    from ftjax.train import fused_plan, resume
    c = base_config()
    c.method.kind = "lora"
    key = lambda **lora: fused_plan.program_key(fused_plan.with_overrides(
        c, {f"method.lora.{k}": v for k, v in lora.items()}))
    assert key(rank=4) == key(rank=8)  # plain LoRA: the rank is padded and masked
    assert key(init="pissa", rank=4) != key(init="pissa", rank=8)  # A0, B0 of the arm's rank
    assert key(init="pissa", rank=4, alpha=2.0) == key(init="pissa", rank=4, alpha=8.0)
    assert key(plus_ratio=4.0) != key(plus_ratio=8.0)  # the ratio is a constant of the program
    assert key(dropout=0.1) == key(dropout=0.3)  # the keep probability is state
    assert key(dropout=0.0) != key(dropout=0.1)  # rate 0 has no dropout in its program
    assert resume._may_change("method.lora.plus_ratio") and not resume._may_change("method.lora.init")
