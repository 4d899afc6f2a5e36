"""The training loop: owns checkpoints, logging, evaluation and preemption around the pure step.

Re-running on a workdir that holds checkpoints resumes from the newest intact one (params,
optimizer, step, RNG and the data iterator's position), so an interrupted run continues exactly:
a damaged newer checkpoint is moved aside, a config that changes what the checkpoints hold is
refused before anything is built (``resume``), and the logs are cut back to the restored step
(``logger``). SIGTERM (a preempted TPU VM) makes the loop save at the next step boundary and exit
cleanly.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ftjax import distributed, sharding
from ftjax.data.prefetch import Prefetcher
from ftjax.eval import tasks as eval_tasks
from ftjax.eval.loop import Evaluator
from ftjax.eval.metrics import format_table
from ftjax.paths import as_path, probe_writable
from ftjax.train import memory, optim, regularizers, resume
from ftjax.train.checkpoint import Checkpointer, abstract_like
from ftjax.train.experiment import Experiment, build
from ftjax.train.flops import peak_flops_per_device, train_flops_per_token
from ftjax.train.logger import MetricsLogger, read_metrics, wandb_options
from ftjax.train.step import TrainState, make_train_step


class _Preemption:
    """Turns SIGTERM into a flag the loop checks at step boundaries."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption support
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        return bool(multihost_utils.process_allgather(np.array(self.requested)).any())


def init_state(exp: Experiment, tx) -> TrainState:
    """A fresh TrainState whose optimizer moments share the parameters' shardings.

    The moments' shardings are given explicitly: ``zeros_like`` carries no sharding, so left to
    XLA every Adam moment came out replicated on every device (an FSDP run's optimizer state
    then cost ``devices`` times its share). A method's own state (``plan.step_hook``) starts
    where its ``init`` placed it."""
    replicated = NamedSharding(exp.mesh, P())
    hook = exp.plan.step_hook
    method_state = hook.init(exp.params) if hook is not None else None
    params_sharding = jax.tree.map(lambda x: x.sharding, exp.params)
    opt_sharding = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, exp.params), params_sharding,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    out = TrainState(step=replicated, params=params_sharding, opt_state=opt_sharding,
                     rng=replicated, method_state=jax.tree.map(lambda x: x.sharding, method_state))
    return jax.jit(lambda p, m: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                           opt_state=tx.init(p),
                                           rng=jax.random.key(exp.config.train.seed), method_state=m),
                   out_shardings=out)(exp.params, method_state)


def write_eval(workdir: epath.Path, metrics: dict, step: int) -> None:
    out = workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=2))


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Train (or resume) per ``config`` in ``workdir``; returns the final eval metrics (or {})."""
    distributed.initialize(config.distributed)
    workdir = as_path(workdir)
    main = distributed.is_main_process()
    if main:
        probe_writable(workdir)  # an unwritable workdir fails here, not at the first checkpoint
    diff = resume.check(workdir, config)  # a resume that cannot work is refused before the build
    exp = build(config)
    t = config.train
    log = MetricsLogger(workdir, total_steps=t.steps, tensorboard=config.log.tensorboard,
                        wandb=wandb_options(config, workdir), enabled=main)
    log.info(f"mesh {dict(exp.mesh.shape)} on {jax.device_count()} devices "
             f"({jax.process_count()} processes); trainable params {exp.num_trainable:,} of "
             f"{exp.num_total:,} ({100 * exp.num_trainable / max(exp.num_total, 1):.2f}%)")

    tx = optim.make_optimizer(t, **exp.plan.optimizer_kwargs())
    budget = memory.for_experiment(exp, tx)
    log.info(budget.summary())
    memory.check(budget)  # refuse (with suggestions) before allocating optimizer state
    state = init_state(exp, tx)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    frozen_sharding = jax.tree.map(lambda x: x.sharding, exp.frozen)
    step_fn = jax.jit(
        make_train_step(exp.graphdef, tx, kind=exp.kind, grad_accum=t.grad_accum,
                        schedule=optim.schedule_shape(t),
                        extra_loss_fn=regularizers.from_config(config, exp),
                        num_tasks=exp.pipe.info.num_tasks, step_hook=exp.plan.step_hook,
                        loss_chunk=t.loss_chunk),
        in_shardings=(state_sharding, frozen_sharding, None),
        out_shardings=(state_sharding, None), donate_argnums=(0,))

    ckpt = Checkpointer(workdir / "checkpoints", config.checkpoint,
                        best_metric=config.eval.best_metric, best_mode=config.eval.best_mode)
    train_iter = exp.pipe.train_iterator(t.batch_size)
    # Tokens and training wall time of the processes before this one, up to the restored step.
    before = {"tokens_seen": 0, "wall_time_s": 0.0}
    restored = ckpt.restore_newest_intact(abstract_like(state))
    if restored is not None:
        for step, problem, moved in restored.damaged:
            log.info(f"checkpoint step {step} is damaged ({problem}): moved it to {moved}; "
                     f"resuming from step {restored.step}, the newest intact checkpoint")
        state = restored.state
        train_iter.set_state(restored.data)
        before = restored.data.get("totals", before)
        log.info(f"resumed from {workdir / 'checkpoints'} at step {restored.step}")
    start = int(state.step)
    # Step n + 1's batch is built and transferred while step n runs; the checkpoints record the
    # position of the batch each step consumed (``batches.get_state``), not of the queued ones.
    batches = Prefetcher(lambda: next(train_iter), train_iter.get_state,
                         lambda b: sharding.shard_batch(b, exp.mesh), t.prefetch)
    if main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        (workdir / "data_report.json").write_text(json.dumps(exp.pipe.report, indent=1))
        if restored is not None:
            resume.record(workdir, start, log.run, diff or {})

    evaluator = Evaluator.for_experiment(exp)

    def evaluate() -> dict:
        return eval_tasks.evaluate(evaluator, state.params, exp.frozen, exp.pipe,
                                   config.eval.batch_size, config.eval.max_batches)

    flops_per_token = None
    peak = peak_flops_per_device()
    last_eval: dict = {}
    run_start, tokens_seen = time.time(), 0
    log.start(start)
    best = _best_logged(workdir, config.eval) if main else {}  # evals before a resume count too
    with _Preemption() as preempt, batches:
        window_start, window_tokens, first_step_time = time.time(), 0, None
        for step in range(start, t.steps):
            batch = next(batches)
            if flops_per_token is None:
                seq_len = batch["input_ids"].shape[1]
                flops_per_token = train_flops_per_token(exp.model, seq_len)
            state, metrics = step_fn(state, exp.frozen, batch)
            window_tokens += batch["input_ids"].size
            tokens_seen += batch["input_ids"].size
            done = step + 1
            if first_step_time is None:
                jax.block_until_ready(state)
                first_step_time = time.time() - window_start
                log.info(f"first step (trace + compile + run) took {first_step_time:.2f}s")
                window_start, window_tokens = time.time(), 0
            if done % config.log.every_steps == 0 or done == t.steps:
                host = eval_tasks.host_train_metrics(jax.device_get(metrics), exp.pipe.info.task_names)
                elapsed = time.time() - window_start
                if window_tokens and elapsed > 0:
                    host["tokens_per_sec"] = window_tokens / elapsed
                    if peak:
                        host["mfu"] = host["tokens_per_sec"] * flops_per_token / (peak * jax.device_count())
                log.log(done, host)
                window_start, window_tokens = time.time(), 0
            final = done == t.steps
            eval_now = exp.pipe.has_eval and (final or (
                config.eval.every_steps and done % config.eval.every_steps == 0))
            eval_metrics = None
            if eval_now:
                eval_metrics = last_eval = evaluate()
                log.log(done, _scalars(eval_metrics), prefix="eval")
                best = _better(best, done, eval_metrics, config.eval)
            stop = preempt.should_stop()
            if eval_now or done % config.checkpoint.every_steps == 0 or stop or final:
                totals = _totals(before, tokens_seen, run_start)
                ckpt.save(done, state, {**batches.get_state(), "totals": totals},
                          metrics=_scalars(eval_metrics) if eval_metrics else None, force=True)
            if stop:
                log.info(f"SIGTERM: saved a checkpoint at step {done}; exiting so the run can resume")
                break
    if int(state.step) >= t.steps and exp.pipe.has_eval:
        if not last_eval:  # a finished run started again: evaluate what it holds
            last_eval = evaluate()
        if main:
            write_eval(workdir, last_eval, int(state.step))
            log.info(format_table(last_eval))
    if main:
        totals = _totals(before, tokens_seen, run_start)
        summary = dict(  # totals over the processes that made the run's steps 1..steps
            run=log.run, steps=int(state.step), resumed_from_step=start,
            trainable_params=exp.num_trainable, total_params=exp.num_total, **totals,
            train_flops=float(totals["tokens_seen"] * (flops_per_token or 0.0)),
            this_process=dict(tokens_seen=tokens_seen, wall_time_s=time.time() - run_start),
            first_step_s=first_step_time,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            final=_scalars(last_eval), best=best)
        (workdir / "run_summary.json").write_text(json.dumps(summary, indent=2))
    ckpt.wait()
    ckpt.close()
    log.close()
    return last_eval


def _totals(before: dict, tokens_seen: int, run_start: float) -> dict:
    """Tokens and wall time of the whole run: the earlier processes' (up to the step this one
    resumed from, as its checkpoint recorded them) plus this process's."""
    return {"tokens_seen": int(before["tokens_seen"]) + tokens_seen,
            "wall_time_s": float(before["wall_time_s"]) + time.time() - run_start}


def _better(best: dict, step: int, metrics: dict, eval_cfg: ml_collections.ConfigDict) -> dict:
    """Keep the best eval so far by ``eval.best_metric`` / ``eval.best_mode``."""
    value = metrics.get(eval_cfg.best_metric)
    if value is None:
        return best
    if not best or (value < best["value"] if eval_cfg.best_mode == "min" else value > best["value"]):
        return {"step": step, "metric": eval_cfg.best_metric, "value": float(value)}
    return best


def _best_logged(workdir: epath.Path, eval_cfg: ml_collections.ConfigDict) -> dict:
    """The best eval among the rows the log holds (after ``log.start``: up to the restored step)."""
    best: dict[str, Any] = {}
    for row in read_metrics(workdir):
        evals = {k[len("eval/"):]: v for k, v in row.items() if k.startswith("eval/")}
        if evals:
            best = _better(best, row["step"], evals, eval_cfg)
    return best


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def load_trained(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                 which: str = "latest") -> tuple[Experiment, int]:
    """Rebuild a run's experiment and put the trained parameters of checkpoint ``which`` in it.

    ``which`` is 'latest', 'best' or a step. The returned experiment's ``params`` (and its
    ``model``) hold the restored weights.
    """
    distributed.initialize(config.distributed)
    exp = build(config)
    ckpt = Checkpointer(as_path(workdir) / "checkpoints", config.checkpoint,
                        best_metric=config.eval.best_metric, best_mode=config.eval.best_mode)
    step = ckpt.resolve(which)
    state = init_state(exp, optim.make_optimizer(config.train, **exp.plan.optimizer_kwargs()))
    state, _ = ckpt.restore(step, abstract_like(state))
    ckpt.close()
    exp.params = state.params
    nnx.update(exp.model, state.params)
    return exp, step
