"""The loop around a fused step: every arm keeps its own workdir, logs, checkpoints and eval.

Each arm's folder ends up as its own ``train.loop.train`` run would leave it (``metrics.jsonl``,
``eval/metrics.json``, ``run_summary.json``, ``checkpoints/`` that ``scripts/evaluate.py`` and
``scripts/export.py`` restore with the arm's own config). The arms step together, so they save at
the same steps; a resume restores every arm at the newest step all of them hold (an arm's newer
checkpoint, left by a kill between two arms' saves, is dropped; each arm keeps one checkpoint
more than ``checkpoint.keep`` for this) and continues exactly.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import time
from typing import Any, Sequence

import jax
import ml_collections
from etils import epath

from ftjax import distributed
from ftjax.data.prefetch import Prefetcher
from ftjax.eval import tasks as eval_tasks
from ftjax.eval.loop import Evaluator
from ftjax.eval.metrics import format_table
from ftjax.paths import probe_writable
from ftjax.train import fused, resume
from ftjax.train.checkpoint import Checkpointer
from ftjax.train.flops import train_flops_per_token
from ftjax.train.logger import MetricsLogger, wandb_options
from ftjax.train.loop import _Preemption, _best_logged, _better, _scalars, _totals, write_eval


def _checkpointer(arm: fused.Arm) -> Checkpointer:
    """The arm's checkpoints, keeping one more than ``checkpoint.keep``: a kill between two arms'
    saves of a step leaves the earlier arms one step ahead, and the step before must survive in
    all of them to resume from."""
    c = arm.config
    cfg = ml_collections.ConfigDict(c.checkpoint.to_dict())
    cfg.keep = int(c.checkpoint.keep) + 1
    return Checkpointer(arm.workdir / "checkpoints", cfg, best_metric=c.eval.best_metric,
                        best_mode=c.eval.best_mode)


def _common_step(ckpts: Sequence[Checkpointer]) -> int | None:
    """The newest step every arm has an intact checkpoint of (newer ones are deleted)."""
    held = [{s for s in c.all_steps() if c.damage(s) is None} for c in ckpts]
    common = set.intersection(*held) if held else set()
    if not common:
        if any(held):
            raise resume.ResumeConfigError(
                "the fused arms' checkpoints have no step in common; resume them separately "
                "(--fuse=off) or start new workdirs")
        return None
    step = max(common)
    for c, steps in zip(ckpts, held):
        for s in sorted(steps):
            if s > step:
                c.manager.delete(s)
    return step


def train_fused(arms: Sequence[tuple[str, ml_collections.ConfigDict, str | os.PathLike]]
                ) -> dict[str, dict[str, Any]]:
    """Train (or resume) ``(name, config, workdir)`` arms as one fused program; returns each
    arm's final eval metrics (or {})."""
    distributed.initialize(arms[0][1].distributed)
    main = distributed.is_main_process()
    for name, config, workdir in arms:
        if main:
            probe_writable(epath.Path(workdir))
    diffs = {name: resume.check(epath.Path(w), c) for name, c, w in arms}
    group = fused.build_group([(n, c, epath.Path(w)) for n, c, w in arms])
    t = group.arms[0].config.train
    logs = [MetricsLogger(a.workdir, total_steps=t.steps, tensorboard=a.config.log.tensorboard,
                          wandb=wandb_options(a.config, a.workdir), enabled=main) for a in group.arms]
    ref = group.exp
    shards = group.mesh.shape.get("arm", 1)
    for a, log in zip(group.arms, logs):
        log.info(f"fused with {group.size - 1} other arm(s) ({', '.join(x.name for x in group.arms)}) "
                 f"on mesh {dict(group.mesh.shape)}; shared batch: {group.shared_batch}; trainable "
                 f"params {a.num_trainable:,} of {a.num_total:,}")
    step_fn = fused.make_fused_step(group)
    ckpts = [_checkpointer(a) for a in group.arms]
    iters = [a.pipe.train_iterator(t.batch_size) for a in group.arms]
    before = [{"tokens_seen": 0, "wall_time_s": 0.0} for _ in group.arms]
    start_step = _common_step(ckpts)
    if start_step is not None:
        states = []
        for i, (a, c, it) in enumerate(zip(group.arms, ckpts, iters)):
            state, data = c.restore(start_step, a.template)
            states.append(state)
            it.set_state(data)
            before[i] = data.get("totals", before[i])
        fused.set_state(group, states)
        for log in logs:
            log.info(f"resumed from the arms' checkpoints at step {start_step}")
    start = int(group.state.step)
    for a, log in zip(group.arms, logs):
        if main:
            (a.workdir / "config.json").write_text(a.config.to_json_best_effort(indent=2))
            (a.workdir / "data_report.json").write_text(json.dumps(a.pipe.report, indent=1))
            (a.workdir / "fused.json").write_text(json.dumps(
                {"arms": [x.name for x in group.arms], "mesh": dict(group.mesh.shape),
                 "shared_batch": group.shared_batch}, indent=1))
            if start_step is not None:
                resume.record(a.workdir, start, log.run, diffs[a.name] or {})

    evaluator = Evaluator.for_experiment(ref)
    frozen_of = functools.partial(fused.merge_frozen, group)
    eval_cfg = group.arms[0].config.eval  # the arms share their eval split and settings

    def evaluate_all() -> list[dict]:
        """Every arm's eval metrics from one vmapped pass (a shared backbone runs once)."""
        return eval_tasks.evaluate_many(
            lambda batches: evaluator.run_arms(group.state.params, group.shared_frozen, group.arm_frozen,
                                               frozen_of, batches, group.size, eval_cfg.max_batches),
            group.arms[0].pipe, eval_cfg.batch_size)

    n = group.size
    flops_per_token = None
    last_eval: list[dict] = [{} for _ in range(n)]
    run_start, tokens_seen = time.time(), 0
    for log in logs:
        log.start(start)
    best = [_best_logged(a.workdir, a.config.eval) if main else {} for a in group.arms]
    window_start, window_tokens, first_step_time = time.time(), 0, None
    has_eval = group.arms[0].pipe.has_eval
    # Arms with one seed read one stream (and record its position as theirs).
    sources = iters[:1] if group.shared_batch else iters
    source_of = [0 if group.shared_batch else i for i in range(n)]
    # The next step's batches are built while this one runs (as in ``train.loop.train``).
    batches = Prefetcher(lambda: [next(it) for it in sources], lambda: [it.get_state() for it in sources],
                         lambda raw: (raw[0]["input_ids"].shape, fused.shard_batches(group, raw)),
                         t.prefetch)
    preempt = _Preemption().__enter__()
    try:
        for step in range(start, t.steps):
            shape, batch = next(batches)
            if flops_per_token is None:
                flops_per_token = train_flops_per_token(ref.model, shape[1])
            group.state, metrics = step_fn(group.state, group.shared_frozen, group.arm_frozen, batch)
            arm_tokens = shape[0] * shape[1]
            window_tokens += arm_tokens
            tokens_seen += arm_tokens
            done = step + 1
            if first_step_time is None:
                jax.block_until_ready(group.state)
                first_step_time = time.time() - window_start
                for log in logs:
                    log.info(f"first step (trace + compile + run) took {first_step_time:.2f}s")
                window_start, window_tokens = time.time(), 0
            final = done == t.steps
            if done % group.arms[0].config.log.every_steps == 0 or final:
                host = jax.device_get(metrics)
                elapsed = time.time() - window_start
                for i, log in enumerate(logs):
                    row = eval_tasks.host_train_metrics({k: v[i] for k, v in host.items()},
                                                        group.arms[i].pipe.info.task_names)
                    if window_tokens and elapsed > 0:
                        row["tokens_per_sec"] = window_tokens / elapsed  # this arm's, in the fused time
                    log.log(done, row)
                window_start, window_tokens = time.time(), 0
            c = group.arms[0].config
            eval_now = has_eval and (final or (c.eval.every_steps and done % c.eval.every_steps == 0))
            stop = preempt.should_stop()
            if eval_now or done % c.checkpoint.every_steps == 0 or stop or final:
                if eval_now:
                    last_eval = evaluate_all()
                for i, (a, log, ckpt) in enumerate(zip(group.arms, logs, ckpts)):
                    eval_metrics = None
                    if eval_now:
                        eval_metrics = last_eval[i]
                        log.log(done, _scalars(eval_metrics), prefix="eval")
                        best[i] = _better(best[i], done, eval_metrics, a.config.eval)
                    data = {**batches.get_state()[source_of[i]],
                            "totals": _totals(before[i], tokens_seen, run_start)}
                    ckpt.save(done, fused.arm_state(group, i), data,
                              metrics=_scalars(eval_metrics) if eval_metrics else None, force=True)
            if stop:
                for log in logs:
                    log.info(f"SIGTERM: saved a checkpoint at step {done}; exiting so the run can resume")
                break
    finally:
        preempt.__exit__(None, None, None)
        batches.close()
    if int(group.state.step) >= t.steps and has_eval and not all(last_eval):
        last_eval = evaluate_all()  # a finished group started again
    for i, (a, log, ckpt) in enumerate(zip(group.arms, logs, ckpts)):
        if int(group.state.step) >= t.steps and has_eval:
            if main:
                write_eval(a.workdir, last_eval[i], int(group.state.step))
                log.info(f"[{a.name}]\n" + format_table(last_eval[i]))
        if main:
            totals = _totals(before[i], tokens_seen, run_start)
            summary = dict(
                run=log.run, steps=int(group.state.step), resumed_from_step=start,
                trainable_params=a.num_trainable, total_params=a.num_total, **totals,
                train_flops=float(totals["tokens_seen"] * (flops_per_token or 0.0)),
                this_process=dict(tokens_seen=tokens_seen, wall_time_s=time.time() - run_start),
                first_step_s=first_step_time,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                final=_scalars(last_eval[i]), best=best[i],
                fused=dict(arms=[x.name for x in group.arms], arm_shards=shards))
            (a.workdir / "run_summary.json").write_text(json.dumps(summary, indent=2))
        ckpt.wait()
        ckpt.close()
        log.close()
    return {a.name: last_eval[i] for i, a in enumerate(group.arms)}


def train_in_groups(arms: Sequence[tuple[str, ml_collections.ConfigDict, str | os.PathLike]],
                    max_arms: int = 0) -> dict[str, dict[str, Any]]:
    """``train_fused`` on chunks of at most ``max_arms`` arms; 0 (auto): all of them, or as many
    as the memory estimate fits when they don't (an explicit ``max_arms`` that doesn't fit is
    refused)."""
    out: dict[str, dict[str, Any]] = {}
    todo, size = list(arms), max_arms or len(arms)
    while todo:
        chunk = todo[:size]
        try:
            out.update(train_fused(chunk) if len(chunk) > 1 else _train_one(chunk[0]))
        except fused.FusedMemoryError as e:
            if max_arms or e.fit < 1:
                raise
            print(f"fused: {len(chunk)} arms do not fit; training {e.fit} at a time", flush=True)
            size = e.fit
            continue
        except fused.FusedError as e:  # found when the arms are built (e.g. a method's own state)
            print(f"fused: {e}", flush=True)
            for arm in chunk:
                out.update(_train_one(arm))
        todo = todo[len(chunk):]
    return out


def _train_one(arm: tuple[str, ml_collections.ConfigDict, str | os.PathLike]) -> dict[str, dict]:
    from ftjax.train.loop import train
    name, config, workdir = arm
    return {name: train(config, workdir)}
