"""AdaLoRA against Hugging Face ``peft`` 0.21 (PyTorch, float32) on a tiny random Llama.

PEFT's folder (random adapter tensors) imported into ftjax gives PEFT's logits and PEFT's
orthogonal regulariser; ftjax's export loads back in PEFT, and the merged plain model gives the
same logits. The rank budget equals ``RankAllocator.budget_schedule`` at every step; fed the same
weights and gradients step after step, ftjax's jitted allocation gives PEFT's
``update_and_allocate`` EMAs, rank pattern and masked singular values through every phase (warmup,
masking every ``deltaT``, the final allocation, the fixed pattern), and PEFT's pruned folder
(``rank_pattern``) imports with PEFT's logits. On the 2x4 mesh a short run learns, ends at the
target budget, and a resume from a checkpoint taken before the masking steps is bitwise exact.
"""

from __future__ import annotations

import types

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
from ftjax.models.loading import from_pretrained
from ftjax.peft import surgery
from ftjax.peft.adalora import FACTORS, AdaLoRALinear, Allocator, budget_schedule
from ftjax.peft.plan import MethodConfigError
from ftjax.train import optim
from ftjax.train.checkpoint import Checkpointer, abstract_like
from ftjax.train.loop import init_state
from ftjax.train.step import make_train_step

MODEL_ATOL = 1e-5  # float32 logits of a 2-layer model, |logits| ~ 1
LAYERS = 2
TARGETS = ["q_proj", "v_proj", "down_proj"]  # square, narrow (GQA) and wide-input kernels
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=3, deltaT=2, total_step=12)  # final step 9
HF = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False)


def hf_config(**overrides) -> hf_peft.AdaLoraConfig:
    kw = dict(SCHEDULE, lora_alpha=6, beta1=0.8, beta2=0.7, orth_reg_weight=0.3,
              target_modules=TARGETS, task_type="CAUSAL_LM")
    return hf_peft.AdaLoraConfig(**{**kw, **overrides})


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama_base")
    transformers.LlamaForCausalLM(transformers.AutoConfig.for_model("llama", **HF)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(3, 96, size=(2, 7))


def peft_model(base) -> hf_peft.PeftModel:
    return hf_peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base), hf_config())


def ftjax_model(base, adapter_dir):
    mesh = sharding.make_mesh({}, devices=jax.devices()[:1])
    model, _ = from_pretrained(base, head="causal_lm", mesh=mesh)
    return peft.import_peft(model, adapter_dir)


def hf_name(path: tuple, layer: int) -> str:
    """ftjax's stacked ``model/layers/self_attn/q_proj`` -> ``model.layers.{layer}.self_attn.q_proj``."""
    assert path[:2] == ("model", "layers"), path
    return ".".join(("model", "layers", str(layer), *path[2:]))


def test_logits_orth_reg_export_and_merge_match_peft(base, ids, tmp_path):
    pm = peft_model(base).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if any(f in name for f in FACTORS):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "hf")
    expected = hf_logits(pm, ids)

    plan = ftjax_model(base, tmp_path / "hf")
    got = np.asarray(plan.model(jnp.asarray(ids)))
    assert np.abs(got - hf_logits(transformers.LlamaForCausalLM.from_pretrained(base), ids)).max() > 0.05
    np.testing.assert_allclose(got, expected, atol=MODEL_ATOL, rtol=0)

    # PEFT adds orth_reg_weight * regulariser to the model's loss (AdaLoraModel.forward)
    labels = torch.tensor(ids)
    with torch.no_grad():
        with_reg = float(pm(input_ids=labels, labels=labels).loss)
        pm.peft_config["default"].orth_reg_weight = 0.0
        without = float(pm(input_ids=labels, labels=labels).loss)
    params = nnx.state(plan.model, plan.trainable)
    np.testing.assert_allclose(float(plan.step_hook.loss(params)), with_reg - without, rtol=2e-5)

    method_cfg = peft.method_from_peft(pm.peft_config["default"].to_dict(), plan.model)
    peft.export_peft(plan.model, method_cfg, tmp_path / "ours", str(base))
    reloaded = hf_peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base),
                                                 tmp_path / "ours").eval()
    np.testing.assert_allclose(hf_logits(reloaded, ids), got, atol=MODEL_ATOL, rtol=0)

    plain = peft.merge_and_unload(plan.model)
    np.testing.assert_allclose(np.asarray(plain(jnp.asarray(ids))), expected, atol=MODEL_ATOL, rtol=0)


def test_budget_schedule_matches_peft(base):
    """A longer schedule than the others, so the cubic's truncation is tested at many steps."""
    from peft.tuners.adalora import RankAllocator
    m = base_config().method
    m.kind = "adalora"
    m.adalora.update(init_r=4, target_r=2, tinit=3, tfinal=7, delta_t=3, total_step=50)
    cfg = hf_config(tinit=3, tfinal=7, deltaT=3, total_step=50)
    hf = RankAllocator(hf_peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base),
                                              cfg).base_model.model, cfg, "default")
    matrices = LAYERS * len(TARGETS)
    assert (hf.init_bgt, hf.target_bgt) == (4 * matrices, 2 * matrices)
    ours = [budget_schedule(s, hf.init_bgt, hf.target_bgt, m.adalora) for s in range(60)]
    assert ours == [hf.budget_schedule(s) for s in range(60)]
    assert len({b for b, _ in ours}) > 8  # the cubic passes through many budgets
    table = Allocator([], hf.init_bgt, hf.target_bgt, m.adalora)  # what the jitted step reads
    assert table.budgets.tolist() == [b for b, _ in ours[:table.final]]


def test_rank_allocation_matches_peft(base, ids, tmp_path):
    """Every phase: EMAs only (steps 0-1), masking at even steps 2-8, the final allocation at 9
    (and the EMAs reset), the fixed pattern at 10-11. Then PEFT's pruned folder imports exactly."""
    pm = peft_model(base).eval()
    hf_params = dict(pm.base_model.model.named_parameters())
    allocator = pm.base_model.rankallocator
    plan = ftjax_model(base, _saved(pm, tmp_path / "init"))
    hook = plan.step_hook
    params = nnx.state(plan.model, plan.trainable)
    state = hook.init(params)
    paths = adapted(plan.model)
    update = jax.jit(hook.update)
    rng = np.random.default_rng(3)

    def stacked(path, factor, hf_values):
        per_layer = [hf_values[f"{hf_name(path, i)}.{factor}.default"] for i in range(LAYERS)]
        return np.stack([v[:, 0] if factor == "lora_E" else v for v in per_layer])

    for step in range(12):
        weights, grads = {}, {}
        with torch.no_grad():
            for name, p in hf_params.items():
                if any(f".{f}." in name for f in FACTORS):
                    weights[name] = rng.standard_normal(p.shape).astype(np.float32)
                    grads[name] = rng.standard_normal(p.shape).astype(np.float32)
                    p.copy_(torch.tensor(weights[name]))
                    p.grad = torch.tensor(grads[name])
        params, grad_state = _with(params, paths, stacked, weights), _with(params, paths, stacked, grads)
        params, state = update(params, grad_state, state, jnp.int32(step))
        pm.base_model.update_and_allocate(step)

        flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(params)}
        after = {n: p.detach().numpy() for n, p in hf_params.items()}
        for path, st in zip(paths, state):
            e = stacked(path, "lora_E", after)
            np.testing.assert_array_equal(np.asarray(flat[path + ("lora_E",)]), e, err_msg=f"{path} {step}")
            for f in FACTORS:
                names = [f"{hf_name(path, i)}.{f}.default" for i in range(LAYERS)]
                if names[0] not in allocator.exp_avg_ipt:  # reset by the final allocation
                    assert step >= 9 and not np.any(np.asarray(st["ipt"][f]))
                    continue
                for which, hf_ema in (("ipt", allocator.exp_avg_ipt), ("unc", allocator.exp_avg_unc)):
                    want = stacked(path, f, {n: hf_ema[n].numpy() for n in names})
                    np.testing.assert_allclose(np.asarray(st[which][f]), want, rtol=1e-6, atol=1e-7)
        pattern = pm.peft_config["default"].rank_pattern
        if pattern and step in (2, 4, 6, 8, 9):
            keep = np.concatenate([np.asarray(st["keep"]).ravel() for st in state])
            want = np.concatenate([np.stack([pattern[f"{hf_name(path, i)}.lora_E.default"]
                                             for i in range(LAYERS)]).ravel() for path in paths])
            np.testing.assert_array_equal(keep, want, err_msg=f"step {step}")
            assert keep.sum() == allocator.budget_schedule(step)[0]
    assert sum(np.asarray(st["keep"]).sum() for st in state) == allocator.target_bgt
    assert pm.peft_config["default"].rank_pattern  # the final allocation was made

    # PEFT's own save after training prunes each layer to its rank (rank_pattern): it imports
    pm.save_pretrained(tmp_path / "pruned")
    ranks = {tuple(t.shape) for k, t in _tensors(tmp_path / "pruned").items() if k.endswith("lora_E")}
    assert len(ranks) > 1  # the layers' ranks differ
    pruned = ftjax_model(base, tmp_path / "pruned")
    np.testing.assert_allclose(np.asarray(pruned.model(jnp.asarray(ids))), hf_logits(pm, ids),
                               atol=MODEL_ATOL, rtol=0)


def adapted(model) -> list[tuple]:
    """The adapted layers' paths in the allocator's (sorted) order."""
    return sorted(p for p, _ in surgery.find(model, AdaLoRALinear))


def _saved(pm, folder):
    pm.save_pretrained(folder)
    return folder


def _tensors(folder) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(folder / "adapter_model.safetensors"))


def _with(params, paths, stacked, values):
    """``params`` with every adapter tensor replaced by PEFT's per-layer ``values``, stacked."""
    flat = []
    for path, var in nnx.to_flat_state(params):
        path = tuple(path)
        if path[:-1] in paths and path[-1] in FACTORS:
            var = var.replace(jnp.asarray(stacked(path[:-1], path[-1], values)))
        flat.append((path, var))
    return nnx.from_flat_state(flat)


def test_bad_schedule_is_one_clear_error():
    m = base_config().method
    m.kind = "adalora"
    model = from_pretrained("tiny-llama", mesh=sharding.make_mesh({}, devices=jax.devices()[:1]))[0]
    with pytest.raises(MethodConfigError, match="adalora.total_step=0"):
        peft.apply_method(model, m)
    m.adalora.update(total_step=10, tinit=8, tfinal=2)
    with pytest.raises(MethodConfigError, match="no budgeting phase"):
        peft.apply_method(model, m)


# ---------------------------------------------------------------------------------------------
# training on the 2x4 mesh, and an exact resume across the masking steps
# ---------------------------------------------------------------------------------------------

T = 16


def test_trains_to_the_target_budget_and_resumes_exactly_on_a_2x4_mesh(tmp_path):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    model = from_pretrained("tiny-llama", mesh=mesh, vocab_size=256)[0]
    data = np.random.default_rng(0).integers(3, 200, size=(8, T))
    b = dict(input_ids=data, segment_ids=np.ones_like(data), targets=np.roll(data, -1, axis=1),
             positions=np.broadcast_to(np.arange(T), data.shape).copy(), loss_mask=np.ones_like(data))
    b = sharding.shard_batch(b, mesh)
    before = np.asarray(model(b["input_ids"]))
    config = base_config()
    m = config.method
    m.kind = "adalora"
    m.adalora.update(init_r=4, target_r=2, tinit=1, tfinal=2, delta_t=1, total_step=8,
                     orth_reg_weight=0.1)
    plan = peft.apply_method(model, m)
    np.testing.assert_allclose(np.asarray(plan.model(b["input_ids"])), before, atol=1e-6, rtol=0)

    graphdef, params, frozen = nnx.split(plan.model, plan.trainable, ...)
    config.train.update(learning_rate=3e-2, warmup_steps=0, schedule="constant", steps=10)
    tx = optim.make_optimizer(config.train, **plan.optimizer_kwargs())
    state = init_state(types.SimpleNamespace(mesh=mesh, params=params, config=config, plan=plan), tx)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(make_train_step(graphdef, tx, kind="lm", step_hook=plan.step_hook),
                   out_shardings=(shardings, None))
    config.checkpoint.async_save = False
    ckpt = Checkpointer(tmp_path / "ckpt", config.checkpoint)
    losses = []
    for i in range(10):  # the budget falls at steps 2-5, is fixed at 6 and applied at 7-9
        if i == 2:
            ckpt.save(i, state, {}, force=True)
        state, metrics = step(state, frozen, b)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses

    keep = [np.asarray(st["keep"]) for st in state.method_state]
    matrices = sum(k.size for k in keep) // 4
    assert sum(k.sum() for k in keep) == 2 * matrices  # target_r per matrix on average
    flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(state.params)}
    for path, k in zip(adapted(plan.model), keep):
        e = np.asarray(flat[path + ("lora_E",)])
        assert not e[~k].any() and e[k].all(), path

    resumed, _ = ckpt.restore(2, abstract_like(state))
    for i in range(2, 10):
        resumed, _ = step(resumed, frozen, b)
    ckpt.close()
    host = lambda x: np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(host(x), host(y), err_msg=jax.tree_util.keystr(path))
