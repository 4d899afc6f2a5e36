"""The memory estimate: Llama-3-8B full vs LoRA by hand (shapes only), activations vs XLA's own
buffer assignment on a small model, and the refusal the train loop gives before compiling."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ftjax import peft, sharding
from ftjax.config import base_config
from ftjax.models import registry
from ftjax.train import memory, optim
from ftjax.train.step import TrainState, make_train_step

LLAMA3_8B_PARAMS = 8_030_261_248  # published count
D, LAYERS, KV = 4096, 32, 1024


def _abstract_split(preset: str, method: str, **overrides):
    family, cfg = registry.get_preset(preset)
    cfg = dataclasses.replace(cfg, **overrides)
    model = nnx.eval_shape(lambda: family.build(cfg, "causal_lm", 0, nnx.Rngs(0)))
    config = base_config()
    config.method.kind = method
    plan = peft.apply_method(model, config.method)
    graphdef, params, frozen = nnx.split(plan.model, plan.trainable, ...)
    return cfg, graphdef, params, frozen, optim.make_optimizer(config.train)


def _estimate(method: str, mesh, **kw) -> memory.MemoryEstimate:
    cfg, _, params, frozen, tx = _abstract_split("llama3-8b", method)
    return memory.estimate(params, frozen, tx, mesh, cfg, trains_everything=method == "full", **kw)


def test_llama3_8b_full_and_lora_match_hand_computation():
    mesh = sharding.make_mesh({"fsdp": 8})
    # Every weight splits 8 ways over fsdp except the 65 RMSNorm scales (replicated).
    norms = (2 * LAYERS + 1) * D
    base = 4 * ((LLAMA3_8B_PARAMS - norms) // 8 + norms)
    full = _estimate("full", mesh, batch_size=8, seq_len=2048)
    assert full.params == base and full.grads == base
    assert 0 <= full.optimizer - 2 * base < 1024  # AdamW: two moments (+ a few scalars)

    # LoRA r=8 on q and v: A [D, 8] splits over fsdp with its kernel's input; B [8, out] is
    # replicated (rank and heads axes are not split on a pure-fsdp mesh).
    lora = 4 * LAYERS * (2 * D * 8 // 8 + 8 * D + 8 * KV)
    cfg, _, params, frozen, tx = _abstract_split("llama3-8b", "lora")
    # Nothing was allocated for the 8B base: its weights are shapes only.
    base_weights = jax.tree.leaves(nnx.filter_state(frozen, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in base_weights)
    est = memory.estimate(params, frozen, tx, mesh, cfg, batch_size=8, seq_len=2048)
    assert est.grads == lora
    scales = 4 * LAYERS * 2  # one float32 LoRA scale per layer and target (frozen state)
    assert est.params == base + lora + scales
    assert 0 <= est.optimizer - 2 * lora < 1024
    assert est.activations == full.activations  # same forward, same batch


def test_refusal_names_the_fixes_and_lora_fits():
    mesh = sharding.make_mesh({"data": 8})  # parameters replicated on every device
    limit = 40 * memory.GIB
    full = _estimate("full", mesh, batch_size=16, seq_len=2048, remat="none", limit=limit)
    assert full.total > limit
    with pytest.raises(memory.MemoryBudgetError) as err:
        memory.check(full)
    msg = str(err.value)
    for fix in ("config.mesh.fsdp=-1", "config.model.remat='full'", "config.train.grad_accum=2",
                "config.method.kind='lora'"):
        assert fix in msg, msg
    assert f"{full.total / memory.GIB:.2f} GiB per device" in msg
    memory.check(_estimate("lora", mesh, batch_size=16, seq_len=2048, remat="full", limit=limit))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_activation_estimate_tracks_xla_buffer_assignment(remat):
    """Activations + gradients (XLA temporaries of the step) within 30% of XLA's own figure."""
    cfg, graphdef, params, frozen, tx = _abstract_split(
        "smollm2-135m", "full", num_layers=2, vocab_size=8192, remat=remat)
    mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
    b, t = 4, 128
    est = memory.estimate(params, frozen, tx, mesh, cfg, batch_size=b, seq_len=t, remat=remat)
    state = jax.eval_shape(lambda p: TrainState(
        step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=jax.random.key(0)), params)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    batch = dict(input_ids=ids, targets=ids, loss_mask=ids, segment_ids=ids, positions=ids)
    compiled = jax.jit(make_train_step(graphdef, tx, kind="lm"), donate_argnums=(0,)).lower(
        state, frozen, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert 0.7 < (est.activations + est.grads) / temp < 1.3, (est.activations, est.grads, temp)


def test_train_loop_refuses_before_compiling(tmp_path, monkeypatch):
    from ftjax.configs.tiny import get_config
    from ftjax.train.loop import train

    monkeypatch.setattr(memory, "device_limit", lambda device=None: 1024 ** 2)
    with pytest.raises(memory.MemoryBudgetError, match="To fit, try"):
        train(get_config("steps=1"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
