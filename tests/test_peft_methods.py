"""Every fine-tuning method as a model transform: what trains, what stays bitwise frozen, sharding,
optimizer-state size, merging, quantisation bounds and memory, and that each one learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ftjax import peft, sharding
from ftjax.config import base_config
from ftjax.models.loading import from_pretrained
from ftjax.peft import quant
from ftjax.peft.lora import LoRALinear
from ftjax.train import optim
from ftjax.train.step import TrainState, make_train_step

T = 16


def mesh_2x4(**axes):
    return sharding.make_mesh(axes or {"data": 2, "fsdp": 4})


def method(kind: str, **sections) -> ml_collections.ConfigDict:
    m = base_config().method
    m.kind = kind
    m.qlora.block_size = 16
    m.prompt.num_virtual_tokens = m.prefix.num_virtual_tokens = 4
    for name, values in sections.items():
        m[name].update(values)
    return m


def train_cfg(**kw) -> ml_collections.ConfigDict:
    t = base_config().train
    t.update(dict(dict(learning_rate=3e-2, warmup_steps=0, schedule="constant", steps=100), **kw))
    return t


def batch(kind: str, rows: int = 8, seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 200, size=(rows, T))
    out = dict(input_ids=ids, segment_ids=np.ones_like(ids),
               positions=np.broadcast_to(np.arange(T), ids.shape).copy())
    if kind == "lm":
        out.update(targets=np.roll(ids, -1, axis=1), loss_mask=np.ones_like(ids))
    else:
        out.update(labels=rng.integers(0, 2, size=rows), example_mask=np.ones(rows, np.int32))
    return {k: jnp.asarray(v) for k, v in out.items()}


_BASES: dict = {}


def model_for(kind: str, mesh, **overrides):
    """A fresh copy of a tiny random model (each built once per mesh and architecture)."""
    overrides.setdefault("vocab_size", 256)  # small logits: the test is about the method
    key = (kind, tuple(mesh.shape.items()), tuple(sorted(overrides.items())))
    if key not in _BASES:
        if kind == "lm":
            _BASES[key] = from_pretrained("tiny-llama", mesh=mesh, **overrides)[0]
        else:
            _BASES[key] = from_pretrained("tiny-bert", head="sequence_classification",
                                          num_labels=2, mesh=mesh, **overrides)[0]
    return nnx.clone(_BASES[key])


def setup(plan: peft.MethodPlan, tcfg: ml_collections.ConfigDict, loss_kind: str):
    graphdef, params, frozen = nnx.split(plan.model, plan.trainable, ...)
    tx = optim.make_optimizer(tcfg, **plan.optimizer_kwargs())
    state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                         opt_state=tx.init(p), rng=jax.random.key(0)))(params)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(make_train_step(graphdef, tx, kind=loss_kind), out_shardings=(shardings, None))
    return state, frozen, step


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


# ---------------------------------------------------------------------------------------------

def test_fresh_lora_is_exact_and_a_step_moves_only_adapters():
    mesh = mesh_2x4()
    model = model_for("lm", mesh)
    b = batch("lm")
    base_logits = np.asarray(model(b["input_ids"]))
    frozen_before = flat(nnx.state(model, nnx.Param))
    plan = peft.apply_method(model, method("lora"))
    np.testing.assert_array_equal(np.asarray(plan.model(b["input_ids"])), base_logits)

    state, frozen, step = setup(plan, train_cfg(weight_decay=0.1), "lm")
    trainable_before = flat(state.params)
    assert set(trainable_before) and all(k.rsplit("/", 1)[-1] in ("lora_a", "lora_b")
                                          for k in trainable_before)
    # Frozen params have no optimizer state: Adam's two moments cover the adapters only.
    assert nbytes(state.opt_state) <= 2 * nbytes(state.params) + 1024
    assert nbytes(state.opt_state) < 0.1 * 2 * nbytes(frozen)  # a tenth of full fine-tuning's
    state, _ = step(state, frozen, b)
    after = flat(state.params)
    assert all(not np.array_equal(after[k], trainable_before[k]) for k in after if "lora_b" in k)
    for k, v in flat(frozen).items():  # base weights untouched, bit for bit
        if k in frozen_before:
            np.testing.assert_array_equal(v, frozen_before[k])


def test_adapters_shard_like_the_kernels_they_adapt():
    mesh = mesh_2x4(fsdp=2, tensor=4)
    model = model_for("lm", mesh)
    peft.apply_method(model, method("lora", lora=dict(targets="(q_proj|down_proj)$")))
    found = [lin for _, lin in peft.wrapped_linears(model)]
    assert len(found) == 2
    for lin in found:
        k = lin.kernel.get_value().sharding.spec
        a = lin.lora_a.get_value().sharding.spec
        b = lin.lora_b.get_value().sharding.spec
        assert lin.lora_a.shape[0] == lin.kernel.shape[0]  # stacked over layers too
        assert (a[0], a[1], b[0], b[2]) == (k[0], k[1], None, k[2])
        assert any(s is not None for s in k[1:])  # the kernel really is split on this mesh


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    mesh = mesh_2x4()
    model = model_for("cls", mesh)
    plan = peft.apply_method(model, method(kind, lora=dict(targets="(query|value|dense)$")))
    rng = np.random.default_rng(1)
    for path, var in nnx.to_flat_state(nnx.state(model, plan.trainable)):
        value = var.get_value()
        var.set_value(jax.device_put(value + 0.3 * rng.standard_normal(value.shape).astype(value.dtype),
                                     value.sharding))
    kernels = {p: np.asarray(lin.kernel.get_value()) for p, lin in peft.wrapped_linears(model)}
    b = batch("cls")
    unmerged = np.asarray(model(b["input_ids"]))
    peft.merge(model)
    np.testing.assert_allclose(np.asarray(model(b["input_ids"])), unmerged, atol=1e-5)
    peft.unmerge(model)
    for p, lin in peft.wrapped_linears(model):
        np.testing.assert_allclose(np.asarray(lin.kernel.get_value()), kernels[p], atol=1e-5)
    np.testing.assert_allclose(np.asarray(model(b["input_ids"])), unmerged, atol=1e-5)
    plain = peft.merge_and_unload(model)
    assert not peft.wrapped_linears(plain)
    np.testing.assert_allclose(np.asarray(plain(b["input_ids"])), unmerged, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantisation_round_trip_bound(kind):
    w = jax.random.normal(jax.random.key(0), (3, 128, 96)) * 0.05
    codes, scales = quant.quantize(w, kind, 64)
    err = np.abs(np.asarray(quant.dequantize(codes, scales, kind, 64) - w))
    absmax = np.repeat(np.asarray(scales), 64, axis=-2)
    bound = absmax / 254 if kind == "int8" else absmax * quant.NF4_MAX_ERROR
    assert np.all(err <= bound * (1 + 1e-5) + 1e-9)
    assert err.mean() < (0.002 if kind == "int8" else 0.02) * np.abs(np.asarray(w)).max()


@pytest.mark.parametrize("kind,ratio", [("int8", (0.24, 0.3)), ("nf4", (0.12, 0.16))])
def test_qlora_base_memory(kind, ratio):
    model = model_for("lm", mesh_2x4(), hidden_size=128, intermediate_size=256)
    float_bytes = sum(lin.kernel.get_value().nbytes for _, lin in nnx.iter_graph(model)
                      if hasattr(lin, "kernel") and lin.kernel.shape[0] == 2)
    peft.apply_method(model, method("qlora", qlora=dict(quant=kind, block_size=64)))
    qkernels = [lin.kernel for _, lin in peft.wrapped_linears(model)]
    assert len(qkernels) == 7 and all(isinstance(k, quant.QuantizedKernel) for k in qkernels)
    measured = sum(k.nbytes for k in qkernels) / float_bytes
    assert ratio[0] < measured < ratio[1], measured


def test_bitfit_without_biases_says_so():
    with pytest.raises(ValueError, match="BitFit trains bias terms, but this llama model has none"):
        peft.apply_method(model_for("lm", mesh_2x4()), method("bitfit"))


def test_gradual_unfreezing_keeps_frozen_blocks_bitwise():
    model = model_for("cls", mesh_2x4(), num_layers=3)
    plan = peft.apply_method(model, method("gradual", gradual=dict(start_blocks=1, every_steps=2)))
    state, frozen, step = setup(plan, train_cfg(weight_decay=0.1), "classification")
    b = batch("cls")
    start = flat(state.params)
    layer_kernel = "model/encoder/layer/attention/self/query/kernel"
    embeddings = "model/embeddings/word_embeddings/embedding"
    changed_layers = []
    for _ in range(6):
        state, _ = step(state, frozen, b)
        now = flat(state.params)
        changed_layers.append([not np.array_equal(now[layer_kernel][i], start[layer_kernel][i])
                               for i in range(3)])
        changed_layers[-1].append(not np.array_equal(now[embeddings], start[embeddings]))
    # [layer0, layer1, layer2, embeddings] after each step: top block first, one more every 2.
    assert changed_layers == [[False, False, True, False]] * 2 + [[False, True, True, False]] * 2 \
        + [[True, True, True, True]] * 2


def test_llrd_scales_updates_per_layer():
    model = model_for("cls", mesh_2x4())
    plan = peft.apply_method(model, method("llrd", llrd=dict(decay=0.5)))
    scales = flat(plan.lr_scale)
    assert scales["classifier/kernel"] == 1.0
    np.testing.assert_allclose(scales["model/encoder/layer/output/dense/kernel"].ravel(), [0.25, 0.5])
    assert scales["model/embeddings/word_embeddings/embedding"] == 0.125


LM_METHODS = ["full", "partial", "gradual", "llrd", "lora", "dora", "qlora", "houlsby", "pfeiffer",
              "ia3", "prefix", "prompt"]
CLS_METHODS = ["head", "bitfit", "prompt"]
LEARNING_RATE = {"ia3": 0.3}  # IA3 rescales by ~1; it needs larger steps to move in 6 steps


@pytest.mark.parametrize("loss_kind,kind", [("lm", k) for k in LM_METHODS]
                         + [("classification", k) for k in CLS_METHODS])
def test_every_method_learns_on_a_2x4_mesh(loss_kind, kind):
    mesh = mesh_2x4()
    model = model_for("lm" if loss_kind == "lm" else "cls", mesh)
    plan = peft.apply_method(model, method(kind, partial=dict(top_blocks=1),
                                           gradual=dict(every_steps=2)))
    state, frozen, step = setup(plan, train_cfg(learning_rate=LEARNING_RATE.get(kind, 3e-2)),
                                loss_kind)
    b = sharding.shard_batch(jax.device_get(batch("lm" if loss_kind == "lm" else "cls")), mesh)
    losses = []
    for _ in range(6):
        state, metrics = step(state, frozen, b)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.02, losses


def test_lora_alpha_is_traced_so_alpha_sweeps_share_one_compile():
    """Two alphas: the same graph (one compiled program), and the weight update scales with alpha."""
    mesh = mesh_2x4()
    b = batch("lm")
    plans = [peft.apply_method(model_for("lm", mesh), method("lora", lora=dict(alpha=a)))
             for a in (8.0, 32.0)]
    graphdefs = [nnx.split(p.model, p.trainable, ...)[0] for p in plans]
    assert graphdefs[0] == graphdefs[1]
    deltas = []
    for p in plans:  # the same A (same seed) and the same non-zero B, so only the scale differs
        lins = [lin for _, lin in nnx.iter_graph(p.model) if isinstance(lin, LoRALinear)]
        for lin in lins:
            lin.lora_b[...] = jnp.full_like(lin.lora_b[...], 0.01)
        deltas.append([np.asarray(lin.delta()) for lin in lins])
    for d8, d32 in zip(*deltas):
        np.testing.assert_allclose(d32, 4 * d8, rtol=1e-6)
    assert np.abs(np.asarray(plans[0].model(b["input_ids"]))
                  - np.asarray(plans[1].model(b["input_ids"]))).max() > 1e-4
