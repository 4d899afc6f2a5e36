"""Fused arms (ftjax.train.fused): every arm of a fused group trains as the same arm run alone.

The reference is the ordinary train loop (``train.loop.train``) on each arm's own config, in
its own workdir. float32 on CPU: loss curves within rtol 1e-5 / atol 1e-6, final eval loss
within 1e-5 and the same accuracy, trained parameters within atol 1e-6 (in practice they agree
bitwise on one device). A tiny random BERT saved by transformers is the pretrained backbone, so
the frozen weights are the same for every seed and are shared.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import xla

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    import torch
    import transformers
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-bert")
    transformers.BertModel(transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64)).save_pretrained(out)
    return out


def _config(bert_dir: Path, devices: int = 1, **overrides):
    from ftjax.configs.demo import get_config
    from ftjax.train.fused_plan import with_overrides
    from ftjax.models.assets import minilm_path
    c = get_config(f"steps={STEPS},batch=8,seq_len=16")
    c.model.source = str(bert_dir)
    c.data.tokenizer = str(minilm_path())
    c.mesh.num_devices = devices
    c.train.warmup_steps = 1
    c.log.every_steps = 1
    c.log.tensorboard = False
    c.eval.max_batches = 1
    c.checkpoint.async_save = False
    return with_overrides(c, {"method.kind": "lora", **overrides})


LORA_ARMS = {  # lr, seed, alpha, rank and dropout rate differ inside one group
    "r8": {"train.learning_rate": 3e-3, "method.lora.dropout": 0.1},
    "r4-a4-lr1e-2": {"method.lora.rank": 4, "method.lora.alpha": 4.0, "train.learning_rate": 1e-2,
                     "method.lora.dropout": 0.3},
    "s1": {"train.seed": 1, "method.lora.alpha": 8.0, "method.lora.dropout": 0.1},
}


def _losses(workdir: Path) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def _eval(workdir: Path) -> dict:
    return json.loads((workdir / "eval" / "metrics.json").read_text())


def _params(config, workdir: Path) -> dict:
    """The arm's trained parameters as ``scripts/evaluate.py`` / ``export.py`` restore them."""
    import jax
    from ftjax.train.loop import load_trained
    exp, _ = load_trained(config, workdir)
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(exp.params)}


def _assert_same_run(fused_dir: Path, alone_dir: Path, config) -> None:
    np.testing.assert_allclose(_losses(fused_dir), _losses(alone_dir), rtol=1e-5, atol=1e-6)
    assert len(_losses(fused_dir)) == STEPS
    a, b = _eval(fused_dir), _eval(alone_dir)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    assert a["accuracy"] == b["accuracy"] and a["step"] == b["step"] == STEPS
    p, q = _params(config, fused_dir), _params(config, alone_dir)
    assert p.keys() == q.keys()
    for k in p:
        np.testing.assert_allclose(p[k], q[k], atol=1e-6, err_msg=k)
    summary = json.loads((fused_dir / "run_summary.json").read_text())
    assert summary["steps"] == STEPS and summary["final"]["accuracy"] == b["accuracy"]


@pytest.fixture(scope="module")
def alone(bert_dir, tmp_path_factory) -> dict[str, Path]:
    """Each LoRA arm trained on its own by the ordinary loop (one device)."""
    from ftjax.train.loop import train
    root = tmp_path_factory.mktemp("alone")
    for name, o in LORA_ARMS.items():
        train(_config(bert_dir, **o), root / name)
    return {name: root / name for name in LORA_ARMS}


@pytest.mark.parametrize("devices", [1, 8], ids=["1-device", "8-devices-arm-sharded"])
def test_fused_lora_arms_equal_their_separate_runs(bert_dir, alone, tmp_path, devices):
    from ftjax.train import fused_loop
    names = list(LORA_ARMS) if devices == 1 else ["r8", "r4-a4-lr1e-2"]
    arms = [(n, _config(bert_dir, devices, **LORA_ARMS[n]), tmp_path / n) for n in names]
    fused_loop.train_fused(arms)
    info = json.loads((tmp_path / names[0] / "fused.json").read_text())
    assert info["mesh"].get("arm", 1) == (2 if devices == 8 else 1)  # 2 arms x fsdp 4 on 8
    for n in names:
        _assert_same_run(tmp_path / n, alone[n], _config(bert_dir, **LORA_ARMS[n]))


@pytest.mark.parametrize("kind,arms", [
    ("pfeiffer", {"a": {}, "b": {"train.seed": 1, "train.learning_rate": 3e-3}}),
    ("bitfit", {"a": {}, "b": {"train.learning_rate": 1e-2, "train.weight_decay": 0.0}}),
    ("head", {"a": {}, "b": {"train.learning_rate": 1e-2}}),  # one seed: shared batch and backbone
])
def test_fused_methods_equal_their_separate_runs(bert_dir, tmp_path, kind, arms):
    from ftjax.train import fused_loop
    from ftjax.train.loop import train
    configs = {n: _config(bert_dir, **{"method.kind": kind, **o}) for n, o in arms.items()}
    fused_loop.train_fused([(n, c, tmp_path / "fused" / n) for n, c in configs.items()])
    train(configs["b"], tmp_path / "alone")  # the arm that is not the group's reference
    _assert_same_run(tmp_path / "fused" / "b", tmp_path / "alone", configs["b"])


SWEEP_FILE = '''
from ftjax.configs import demo
from ftjax.models.assets import minilm_path
from ftjax.train.fused_plan import with_overrides

def get_config(arg=None):
    c = demo.get_config("steps={steps},batch=8,seq_len=16")
    return with_overrides(c, {{"model.source": "{bert}", "data.tokenizer": str(minilm_path()),
        "mesh.num_devices": 1, "train.warmup_steps": 1, "log.every_steps": 1,
        "log.tensorboard": False, "eval.max_batches": 1, "checkpoint.async_save": False,
        "checkpoint.every_steps": 2, "method.kind": "lora"}})

def sweep():
    return [{{"name": "a"}}, {{"name": "b", "train.seed": 1, "method.lora.rank": 4}},
            {{"name": "full", "method.kind": "full"}}]
'''


def test_kill_and_resume_of_a_fused_run_is_exact(bert_dir, tmp_path):
    from ftjax.experiments import sweep
    from ftjax.train import fused_loop
    config = tmp_path / "sweep_cfg.py"
    config.write_text(SWEEP_FILE.format(steps=8, bert=bert_dir))
    every = [a for a, _ in sweep.arm_configs(str(config), tmp_path)]
    assert [[a.name for a in g] for g in sweep.fusion_groups(str(config), tmp_path, every)] == [
        ["a", "b"], ["full"]]  # the sweep fuses the LoRA arms, full fine-tuning runs alone
    arms = sweep.arm_configs(str(config), tmp_path / "killed", ["a", "b"])
    full = tmp_path / "full"
    fused_loop.train_fused([(a.name, c, full / a.name) for a, c in arms])

    killed = tmp_path / "killed"
    cmd = sweep.group_command(str(config), [a for a, _ in arms], killed)
    env = dict(os.environ, XLA_FLAGS=xla.flags(1), PYTHONUNBUFFERED="1")  # same codegen as in-process
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = killed / "arms" / "b" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (log.exists() and len(_losses(log.parent)) >= 5):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "step 5 not reached"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from the arms' checkpoints at step" in r.stdout
    for a, c in arms:
        np.testing.assert_array_equal(_losses(killed / "arms" / a.name), _losses(full / a.name))
        p, q = _params(c, killed / "arms" / a.name), _params(c, full / a.name)
        for k in p:
            np.testing.assert_array_equal(p[k], q[k], err_msg=k)  # bitwise on CPU


def test_fuse_flag_and_memory_refusal():
    from ftjax.train import fused, fused_plan, memory
    assert [fused_plan.parse_fuse(v) for v in ("off", "auto", "max_arms=3")] == [None, 0, 3]
    with pytest.raises(fused_plan.FuseFlagError, match="max_arms=N"):
        fused_plan.parse_fuse("max_arms=0")
    assert fused_plan.group_by_program(list("aabab"), lambda x: x, max_arms=2) == [
        ["a", "a"], ["a"], ["b", "b"]]
    gib = memory.GIB
    est = memory.MemoryEstimate(params=3 * gib, grads=gib // 4, optimizer=gib // 2,
                                activations=gib // 4, limit=5 * gib, remat="none",
                                activations_by_remat={}, trains_everything=False,
                                batch_per_device=8, grad_accum=1, model_shards=1, devices=1)
    # frozen 2.75 GiB once + 1.25 GiB per arm: 1 arm fits in 5 GiB, 2 do not; 2 shards hold 2.
    assert fused.budget(est, 2, 1) == (int(2.75 * gib + 2 * 1.25 * gib), 1)
    assert fused.budget(est, 2, 2)[1] == 2
    # one arm per pass (a CPU, per-arm batches): gradients + activations (0.5 GiB) once, each
    # arm's params + optimizer state (0.75 GiB) kept: 2.75 + 2 x 0.75 + 0.5 = 4.75 GiB, 2 fit.
    assert fused.budget(est, 2, 1, per_pass=1) == (int(4.75 * gib), 2)
    assert fused.budget(est, 4, 1, per_pass=1)[1] == 2
    with pytest.raises(fused.FusedMemoryError, match="at most 1 fit: use --fuse=max_arms=1"):
        fused._check_budget(est, 2, 1)


def test_a_method_with_its_own_step_state_is_not_fused(bert_dir):
    """AdaLoRA's rank allocation lives in its own train step: build_group refuses its arms
    (FusedError), which train_in_groups answers by training them one at a time."""
    from ftjax.train import fused
    arms = [(f"s{s}", _config(bert_dir, **{"method.kind": "adalora", "method.adalora.total_step": STEPS,
                                           "train.seed": s}), bert_dir.parent / f"adalora-s{s}")
            for s in (0, 1)]
    with pytest.raises(fused.FusedError, match="'adalora' keeps state its own train step updates"):
        fused.build_group(arms)
