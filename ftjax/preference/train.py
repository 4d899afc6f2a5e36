"""Preference tuning (DPO & co) or reward-model training from one config: the run.

``config.data.task = "preference"``; ``config.model.head = "reward"`` trains a Bradley-Terry
reward model on the pairs, any other head runs ``config.preference.loss`` against the reference
policy ``config.preference.reference``. Writes ``metrics.jsonl`` (+ TensorBoard),
``config.json``, ``data_report.json`` (with the quarantine), ``eval/metrics.json`` when there is
an eval split, ``run_summary.json`` and the trained model (adapters merged) as a Hugging Face
folder ``model/`` that ``from_pretrained``, the generator and the server load.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ftjax import models, peft, sharding
from ftjax.data import pipeline, prepare
from ftjax.data import preference as pdata
from ftjax.models.saving import save_pretrained
from ftjax.paths import as_path
from ftjax.preference import losses, reference, reward
from ftjax.preference import step as pstep
from ftjax.train import optim, warm_start
from ftjax.train.logger import MetricsLogger
from ftjax.train.step import TrainState


def _model(config: ml_collections.ConfigDict) -> tuple[nnx.Module, Any]:
    mesh_sizes = {k: v for k, v in config.mesh.items() if k != "num_devices"}
    devices = jax.devices()[:config.mesh.num_devices] if config.mesh.num_devices else None
    mesh = sharding.make_mesh(mesh_sizes, devices)
    model_cfg = ml_collections.ConfigDict(config.model.to_dict())
    model_cfg.head, num_labels = reward.model_head(config.model.head, config.model.num_labels)
    model, tokenizer = models.create(model_cfg, mesh, num_labels=num_labels, seed=config.train.seed)
    if config.data.tokenizer or tokenizer is None:
        tokenizer = pipeline.load_tokenizer(config.data)
    return model, tokenizer


def _reference(config, model: nnx.Module, split: str, pairs: pdata.Pairs, tokenizer: Any, workdir
               ) -> np.ndarray:
    """Reference log-probs ``[N, 2]`` of the starting model, computed once and cached."""
    key = f"{prepare.cache_key(config.data, tokenizer)}:{split}"
    directory = prepare.cache_dir(config.data) or os.fspath(workdir)
    graphdef, state = nnx.split(model)
    batch = config.eval.batch_size
    chunks = [pdata.batch_arrays(pairs, np.arange(i, min(i + batch, len(pairs))))
              for i in range(0, len(pairs), batch)]
    source = json.dumps([config.model.source, config.model.init_from, config.method.to_dict()])
    return reference.cached(reference.cache_path(key, source, directory),
                            lambda: pstep.reference_logps(graphdef, state, chunks))


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Run ``config`` in ``workdir``; returns the eval metrics (or {})."""
    workdir = as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_reward = config.model.head == reward.HEAD
    if not is_reward:
        losses.check(config.preference)
    if config.train.grad_accum != 1:
        raise losses.PreferenceConfigError(f"config.train.grad_accum={config.train.grad_accum}: preference "
                                           f"runs take one batch per step; set grad_accum=1")
    model, tokenizer = _model(config)
    splits, report, quarantine = pdata.prepare(config.data, tokenizer)
    plan = peft.apply_method(model, config.method, tokenizer)
    plan.refuse_step_hook("preference training", "choose another config.method.kind")
    graphdef, params, frozen = nnx.split(plan.model, plan.trainable, ...)
    if config.model.init_from:  # e.g. the SFT run a DPO run starts from (and takes as reference)
        params, frozen = warm_start.restore_trained(params, frozen, config.model.init_from)
    t = config.train
    tx = optim.make_optimizer(t, **plan.optimizer_kwargs())
    schedule = optim.schedule_shape(t)
    mode, ref_params, ref_logps = "", None, {}
    if is_reward:
        step_fn = jax.jit(reward.make_reward_step(graphdef, tx, schedule=schedule))
        eval_fn = jax.jit(lambda p, f, b: reward.bradley_terry(reward.pair_rewards(nnx.merge(graphdef, p, f), b))[1])
    else:
        mode = reference.resolve(config.preference.reference, plan.model)
        if mode == "copy":
            ref_params = reference.frozen_copy(params)
        if mode == "precomputed":
            ref_logps = {s: _reference(config, nnx.merge(graphdef, params, frozen), s, p, tokenizer, workdir) for s, p in splits.items()}
        step = pstep.make_preference_step(graphdef, tx, config.preference, reference_mode=mode, schedule=schedule)
        step_fn = jax.jit(lambda st, f, b, r: step(st, f, b, r), donate_argnums=(0,))
        eval_fn = jax.jit(lambda p, f, b, r: pstep.make_loss_fn(graphdef, config.preference, mode)(
            p, f, b, r, None)[1])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.key(t.seed))
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    (workdir / "data_report.json").write_text(json.dumps(dict(report, quarantine=quarantine), indent=1))
    log = MetricsLogger(workdir, total_steps=t.steps, tensorboard=config.log.tensorboard)
    log.info(f"{'reward model' if is_reward else config.preference.loss} on {len(splits['train'])} pairs; "
             f"reference={mode or '-'}; trainable params {sum(x.size for x in jax.tree.leaves(params)):,}")

    def with_ref(split: str, b: dict) -> dict:
        return dict(b, ref_logp=ref_logps[split][b["index"]]) if split in ref_logps else b

    start = time.time()
    log.start(0)
    batches = pdata.train_batches(splits["train"], t.batch_size, t.seed)
    for i in range(t.steps):
        b = with_ref("train", next(batches))
        b = {k: jnp.asarray(v) for k, v in b.items() if k != "index"}
        state, metrics = step_fn(state, frozen, b) if is_reward else step_fn(state, frozen, b, ref_params)
        if (i + 1) % config.log.every_steps == 0 or i + 1 == t.steps:
            log.log(i + 1, {k: float(v) for k, v in jax.device_get(metrics).items()})
    result: dict[str, float] = {}
    if "eval" in splits:
        ev, sums, n = splits["eval"], {}, 0
        for j in range(0, len(ev), config.eval.batch_size):
            idx = np.arange(j, min(j + config.eval.batch_size, len(ev)))
            b = {k: jnp.asarray(v) for k, v in with_ref("eval", pdata.batch_arrays(ev, idx)).items() if k != "index"}
            m = eval_fn(state.params, frozen, b) if is_reward else eval_fn(state.params, frozen, b, ref_params)
            for k, v in jax.device_get(m).items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
            n += len(idx)
        result = {k: v / n for k, v in sums.items()}
        log.log(t.steps, result, prefix="eval")
        (workdir / "eval").mkdir(exist_ok=True)
        (workdir / "eval" / "metrics.json").write_text(json.dumps({"step": t.steps, **result}, indent=2))
    trained = peft.merge_and_unload(nnx.merge(graphdef, state.params, frozen))
    save_pretrained(trained, os.fspath(workdir / "model"), tokenizer)
    (workdir / "run_summary.json").write_text(json.dumps(dict(
        steps=t.steps, wall_time_s=time.time() - start, reference=mode, final=result), indent=2))
    log.close()
    return result
