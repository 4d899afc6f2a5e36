"""scripts/plan.py: the FLOP count against a hand count and XLA's own, the fits decision, the CLI."""

from __future__ import annotations

import dataclasses

import jax
import pytest
from flax import nnx

from ftjax import peft, sharding
from ftjax.models import registry
from ftjax.models.assets import minilm_path
from ftjax.peft.config import method_config
from ftjax.train import hardware, memory
from ftjax.train.flops import step_flops

D, F, L, LABELS = 64, 128, 2, 2  # the tiny-bert preset, a 2-label classifier


def _tiny_bert(kind: str):
    family, cfg = registry.get_preset("tiny-bert")
    cfg = dataclasses.replace(cfg, pooling="pooler")
    model = nnx.eval_shape(lambda: family.build(cfg, "sequence_classification", LABELS, nnx.Rngs(0)))
    m = method_config()
    m.kind = kind
    plan = peft.apply_method(model, m, None)
    return plan.model, plan.trainable


@pytest.mark.parametrize("kind", ["full", "head"])
def test_step_flops_match_a_hand_count(kind):
    b, t = 4, 16
    model, trainable = _tiny_bert(kind)
    got = step_flops(model, trainable, b, t)
    stack = L * (4 * D * D + 2 * D * F)  # q, k, v, attention output; intermediate, output
    pooler, classifier = D * D, D * LABELS  # once per row (sequence), not per token
    scores_and_values = 2 * 2 * b * L * t * t * D  # Q K^T and P V, forward
    if kind == "full":  # everything trains: 6 per weight and row; attention forward + 2x backward
        assert got.trained == 6 * (b * t * stack + b * (pooler + classifier))
        assert got.attention == 3 * scores_and_values
        assert got.frozen_backward == got.frozen_forward == 0
    else:  # only the classifier: forward + weight gradient; the rest forward only
        assert got.trained == 4 * b * classifier
        assert got.frozen_forward == 2 * (b * t * stack + b * pooler)
        assert got.attention == scores_and_values
        assert got.frozen_backward == 0


def _demo_step(kind: str, batch: int, seq_len: int):
    """The demo's train step on a wider tiny BERT, unrolled, one device: (XLA's FLOPs, ours)."""
    from ftjax.configs import demo
    from ftjax.train import optim
    from ftjax.train.experiment import build
    from ftjax.train.fused_plan import with_overrides
    from ftjax.train.loop import init_state
    from ftjax.train.step import make_train_step

    config = with_overrides(demo.get_config(f"model=tiny-bert,batch={batch},seq_len={seq_len}"), {
        "method.kind": kind, "data.tokenizer": str(minilm_path()), "mesh.num_devices": 1,
        "model.scan_layers": False,  # XLA's cost analysis counts a scan's body once, not L times
        "model.overrides": {"hidden_size": 128, "intermediate_size": 512}})
    exp = build(config)
    tx = optim.make_optimizer(config.train, **exp.plan.optimizer_kwargs())
    state = init_state(exp, tx)
    step = jax.jit(make_train_step(exp.graphdef, tx, kind=exp.kind,
                                   schedule=optim.schedule_shape(config.train)))
    data = sharding.shard_batch(next(exp.pipe.train_iterator(batch)), exp.mesh)
    cost = step.lower(state, exp.frozen, data).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"], step_flops(exp.model, exp.plan.trainable, batch, data["input_ids"].shape[1])


@pytest.mark.parametrize("kind", ["full", "lora", "head"])
def test_step_flops_within_10pct_of_xla_cost_analysis(kind):
    """XLA counts every op of the compiled step (norms, softmax, GELU, AdamW too): ours, the
    matmuls alone, must be within 10% of it and not above it."""
    xla, ours = _demo_step(kind, batch=16, seq_len=64)
    assert 0.9 * xla <= ours.total <= xla * 1.02, (kind, ours, xla)


def test_fits_against_the_devices_memory():
    est = memory.MemoryEstimate(params=6 * memory.GIB, grads=4 * memory.GIB, optimizer=8 * memory.GIB,
                                activations=memory.GIB, limit=None, remat="none",
                                activations_by_remat={}, trains_everything=True, batch_per_device=1,
                                grad_accum=1, model_shards=1, devices=8)
    v5e, h100 = hardware.get("v5e-8"), hardware.get("h100x8")
    assert not dataclasses.replace(est, limit=v5e.memory_bytes).fits  # 19 GiB > 16 GiB
    assert dataclasses.replace(est, limit=h100.memory_bytes).fits  # 19 GiB < 80 GB


def test_unknown_hardware_is_one_error_line(monkeypatch, capsys):
    from ftjax.commands import plan
    monkeypatch.setattr("sys.argv", ["plan.py", "--config=configs/tiny.py", "--hardware=v4-32"])
    with pytest.raises(SystemExit) as e:
        plan.run()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --hardware='v4-32' is not a known target; choose from v5e-8, h100x8, cpu"]


def test_cli_plans_tiny_on_every_target(monkeypatch, capsys):
    from ftjax.commands import plan
    for target in ("cpu", "v5e-8", "h100x8"):
        monkeypatch.setattr("sys.argv", ["plan.py", "--config=configs/tiny.py", f"--hardware={target}",
                                         "--methods=full,lora"])
        with pytest.raises(SystemExit) as e:
            plan.run()
        assert not e.value.code
        out = capsys.readouterr().out
        rows = [line for line in out.splitlines() if line.startswith("| full") or line.startswith("| lora")]
        assert len(rows) == 2 and all(r.endswith("| yes |") for r in rows), out
