"""Few-shot learning as meta-learning: first-order MAML and Reptile over episodes of tasks.

Meta-parameters ``theta`` are whatever ``config.method`` trains (LoRA by default). Each episode
(``ftjax.experiments.episodes``) adapts ``phi = theta`` with ``meta.inner_steps`` plain SGD steps
(lr ``meta.inner_lr``, the train step and optimizer every run uses) on its support batch; then

* ``fomaml``: the meta-gradient is the query loss gradient at ``phi`` (first-order MAML, Finn et
  al. 2017, without second derivatives);
* ``reptile``: the meta-gradient is ``theta - phi`` (Nichol et al. 2018), so an SGD outer step
  of lr ``eps`` is ``theta += eps * (phi - theta)``;

averaged over ``meta.meta_batch`` episodes and applied to ``theta`` by the outer optimizer
(``meta.optimizer``, lr ``meta.meta_lr``, no schedule or clipping).

Tasks have different label sets. A decoder scores text_to_text verbalisers, so nothing depends
on the label set. An encoder classifier gets a per-episode head: the head (``freezing.is_head``
parameters, sized to the most labels of any task; ``label_mask`` restricts it to the episode's
labels) starts every episode at zero and is adapted in the inner loop but never meta-learned.
The result is saved as a run directory (``config.json`` + ``checkpoints/``) holding only the
meta-learned non-head parameters, so a k-shot run starts from it with ``model.init_from`` (its
own head initialised as in any run).
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath
from flax import nnx

from ftjax.errors import FtjaxError
from ftjax.experiments import episodes as episodes_lib
from ftjax.paths import as_path
from ftjax.peft import freezing
from ftjax.train import optim
from ftjax.train.checkpoint import Checkpointer
from ftjax.train.logger import MetricsLogger
from ftjax.train.step import TrainState, make_loss_sum, make_train_step

ALGORITHMS = ("fomaml", "reptile")
SUMMARY = "meta_summary.json"


class MetaConfigError(FtjaxError, ValueError):
    """A ``config.meta`` section that cannot work."""


def meta_config() -> ml_collections.ConfigDict:
    """The ``config.meta`` section (a few-shot config adds it)."""
    return ml_collections.ConfigDict(dict(
        algorithm="fomaml",  # fomaml | reptile
        tasks=ml_collections.ConfigDict(),  # name -> overrides of config.data (train split)
        k=4,  # support examples per label
        queries=8,  # query examples per label (disjoint from the support)
        inner_steps=5,  # SGD steps on the support from theta
        inner_lr=1e-2,
        meta_steps=100,  # outer updates
        meta_batch=2,  # episodes per outer update (meta_steps * meta_batch episodes in all)
        meta_lr=1.0,  # outer lr (reptile's epsilon for optimizer=sgd)
        optimizer="sgd",  # outer optimizer: sgd | adamw
        seed=0,  # episode draws
    ))


def _check(m: ml_collections.ConfigDict) -> None:
    if m.algorithm not in ALGORITHMS:
        raise MetaConfigError(f"config.meta.algorithm={m.algorithm!r}; choose from {ALGORITHMS}")
    if m.optimizer not in optim.OPTIMIZERS:
        raise MetaConfigError(f"config.meta.optimizer={m.optimizer!r}; choose from {optim.OPTIMIZERS}")
    for key in ("inner_steps", "meta_steps", "meta_batch"):
        if int(m[key]) < 1:
            raise MetaConfigError(f"config.meta.{key}={m[key]} must be >= 1")


def _plain(train_cfg: ml_collections.ConfigDict, optimizer: str, lr: float, grad_clip: float
           ) -> ml_collections.ConfigDict:
    """``config.train`` as a constant-rate optimizer: no warmup, no decay, no weight decay."""
    c = ml_collections.ConfigDict(train_cfg.to_dict())
    c.update(optimizer=optimizer, learning_rate=float(lr), schedule="constant", warmup_steps=0,
             weight_decay=0.0, grad_clip=float(grad_clip))
    return c


def inner_optimizer(config: ml_collections.ConfigDict, **method_kwargs) -> optax.GradientTransformation:
    """Inner loop: SGD at ``meta.inner_lr`` (``train.grad_clip`` applies)."""
    return optim.make_optimizer(_plain(config.train, "sgd", config.meta.inner_lr, config.train.grad_clip),
                                **method_kwargs)


def outer_optimizer(config: ml_collections.ConfigDict, **method_kwargs) -> optax.GradientTransformation:
    """Outer update: ``meta.optimizer`` at ``meta.meta_lr`` on the averaged meta-gradient."""
    return optim.make_optimizer(_plain(config.train, config.meta.optimizer, config.meta.meta_lr, 0.0),
                                **method_kwargs)


def head_reset(kind: str) -> Callable[[Any], Any]:
    """Zeroes the task head of a tree shaped like the params (classification); else identity."""
    if kind != "classification":
        return lambda tree: tree

    def reset(tree):
        return nnx.from_flat_state([(p, v.replace(jnp.zeros_like(v.get_value())) if freezing.is_head(p) else v)
                                    for p, v in nnx.to_flat_state(tree)])
    return reset


def without_head(params: Any) -> Any:
    """The meta-learned part of the params: everything but the task head."""
    return nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(params) if not freezing.is_head(p)])


def make_meta_step(graphdef: nnx.GraphDef, kind: str, inner_tx: optax.GradientTransformation,
                   outer_tx: optax.GradientTransformation, *, algorithm: str, inner_steps: int,
                   loss_chunk: int = 0):
    """``meta_step(state, frozen, batches) -> (state, metrics)`` (not jitted); ``batches`` holds
    ``support`` and ``query`` batches stacked ``[episodes, rows, ...]``; ``state.params`` is theta."""
    if algorithm not in ALGORITHMS:
        raise MetaConfigError(f"config.meta.algorithm={algorithm!r}; choose from {ALGORITHMS}")
    inner_step = make_train_step(graphdef, inner_tx, kind=kind, loss_chunk=loss_chunk)
    loss_sum = make_loss_sum(graphdef, kind, loss_chunk=loss_chunk)
    reset = head_reset(kind)

    def episode(theta, frozen, support, query, rng):
        adapt_rng, query_rng = jax.random.split(rng)
        phi = reset(theta)
        inner = TrainState(step=jnp.zeros((), jnp.int32), params=phi, opt_state=inner_tx.init(phi), rng=adapt_rng)
        inner, inner_metrics = jax.lax.scan(lambda s, _: inner_step(s, frozen, support), inner, None,
                                            length=inner_steps)
        phi = inner.params
        if algorithm == "fomaml":
            (_, (total, weight, correct)), grads = jax.value_and_grad(loss_sum, has_aux=True)(
                phi, frozen, query, query_rng)
            delta = jax.tree.map(lambda g: g / jnp.maximum(weight, 1.0), grads)
        else:
            _, (total, weight, correct) = loss_sum(phi, frozen, query, query_rng)
            delta = jax.tree.map(jnp.subtract, theta, phi)
        denom = jnp.maximum(weight, 1.0)
        metrics = dict(support_loss_first=inner_metrics["loss"][0], support_loss=inner_metrics["loss"][-1],
                       query_loss=total / denom, query_accuracy=correct / denom)
        return reset(delta), metrics

    def meta_step(state: TrainState, frozen: Any, batches: dict[str, dict[str, jax.Array]]):
        count = jax.tree.leaves(batches["support"])[0].shape[0]
        keys = jax.random.split(jax.random.fold_in(state.rng, state.step), count)
        deltas, metrics = jax.lax.map(
            lambda x: episode(state.params, frozen, x[0], x[1], x[2]),
            (batches["support"], batches["query"], keys))
        delta = jax.tree.map(lambda d: jnp.mean(d, axis=0), deltas)
        updates, opt_state = outer_tx.update(delta, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: jnp.mean(v) for k, v in metrics.items()}
        metrics["meta_grad_norm"] = optax.tree.norm(delta)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return meta_step


def head_size(config: ml_collections.ConfigDict) -> int:
    """Classification: the most labels any meta task declares (``labels`` in its overrides)."""
    sizes = []
    for name, overrides in config.meta.tasks.items():
        labels = overrides.get("labels")
        if not labels:
            raise MetaConfigError(f"config.meta.tasks.{name}: declare its labels (the episode head "
                                  f"is sized to the most labels of any task)")
        sizes.append(len(labels))
    return max(sizes)


def train_meta(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> epath.Path:
    """Meta-train per ``config.meta`` into ``workdir`` (reused when finished); returns it."""
    from ftjax.train.experiment import build

    workdir = as_path(workdir)
    if (workdir / SUMMARY).exists():
        print(f"meta-training: {workdir} is finished, reused", flush=True)
        return workdir
    m = config.meta
    _check(m)
    if not m.tasks:
        raise MetaConfigError("config.meta.tasks is empty: name the meta-training tasks")
    mc = copy.deepcopy(config)
    classification = config.data.task == "classification"
    if classification:
        mc.model.num_labels = head_size(config)
    exp = build(mc)
    if exp.kind not in ("classification", "lm"):
        raise MetaConfigError(f"meta-learning needs a sequence classifier or a causal LM, not {config.model.head!r}")
    exp.plan.refuse_step_hook("meta-training", "choose another config.method.kind")
    kept = without_head(exp.params) if classification else exp.params
    if not jax.tree.leaves(kept):
        raise MetaConfigError(f"config.method.kind={config.method.kind!r} trains only the task head, "
                              "which every episode resets: nothing to meta-learn")
    tasks = episodes_lib.load_tasks(config.data, m.tasks, exp.tokenizer)
    batcher = episodes_lib.EpisodeBatcher(
        tasks, k=int(m.k), q=int(m.queries), seed=int(m.seed), seq_len=int(config.data.seq_len),
        pad_id=exp.pipe.info.pad_id, classification=classification, num_labels=int(mc.model.num_labels))
    kwargs = exp.plan.optimizer_kwargs()
    inner_tx, outer_tx = inner_optimizer(config, **kwargs), outer_optimizer(config, **kwargs)
    theta = head_reset(exp.kind)(exp.params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=theta, opt_state=outer_tx.init(theta),
                       rng=jax.random.key(int(m.seed)))
    step_fn = jax.jit(make_meta_step(exp.graphdef, exp.kind, inner_tx, outer_tx, algorithm=m.algorithm,
                                     inner_steps=int(m.inner_steps), loss_chunk=config.train.loss_chunk),
                      donate_argnums=(0,))
    log = MetricsLogger(workdir, total_steps=int(m.meta_steps), tensorboard=False)
    log.info(f"meta-training ({m.algorithm}) on {[t.name for t in tasks]}: {m.meta_steps} steps x "
             f"{m.meta_batch} episodes, k={m.k} support + {m.queries} query per label, "
             f"{m.inner_steps} inner SGD steps at lr {m.inner_lr}; meta-learning "
             f"{sum(x.size for x in jax.tree.leaves(kept)):,} parameters")
    log.start(0)
    start, history = time.time(), []
    for step in range(int(m.meta_steps)):
        _, batches = batcher.batch(step * int(m.meta_batch), int(m.meta_batch))
        state, metrics = step_fn(state, exp.frozen, batches)
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
        if (step + 1) % max(1, config.log.every_steps) == 0 or step + 1 == int(m.meta_steps):
            window = history[-max(1, config.log.every_steps):]
            log.log(step + 1, {k: sum(h[k] for h in window) / len(window) for k in window[0]})
    wall = time.time() - start
    params = without_head(state.params) if classification else state.params
    ckpt_cfg = ml_collections.ConfigDict(dict(keep=1, keep_best=False, async_save=False))
    ckpt = Checkpointer(workdir / "checkpoints", ckpt_cfg)
    ckpt.save(int(m.meta_steps), TrainState(step=state.step, params=params, opt_state=None, rng=state.rng), {},
              force=True)
    ckpt.wait()
    ckpt.close()
    log.close()
    (workdir / "config.json").write_text(mc.to_json_best_effort(indent=2))
    tail = history[-min(len(history), 10):]
    summary = dict(algorithm=m.algorithm, tasks=[t.name for t in tasks], meta_steps=int(m.meta_steps),
                   episodes=int(m.meta_steps) * int(m.meta_batch), wall_time_s=wall,
                   meta_learned_params=int(sum(x.size for x in jax.tree.leaves(params))),
                   first={k: v for k, v in history[0].items()},
                   last10={k: sum(h[k] for h in tail) / len(tail) for k in tail[0]})
    (workdir / SUMMARY).write_text(json.dumps(summary, indent=2))
    return workdir


def meta_dir(workdir: str | os.PathLike, algorithm: str) -> epath.Path:
    """Where a study keeps the weights ``algorithm`` meta-learned: ``DIR/meta-<algorithm>``."""
    return as_path(workdir) / f"meta-{algorithm}"


def meta_arms(arms: list, directory: str | os.PathLike, algorithm: str) -> list:
    """The k-shot fine-tuning arms again, each starting from the weights in ``directory``
    (named and grouped ``<algorithm>-<name>``, ``<algorithm> <group>``)."""
    from ftjax.experiments.sweep import Arm

    return [Arm(name=f"{algorithm}-{a.name}", group=f"{algorithm} {a.group}", seed=a.seed,
                overrides={**a.overrides, "model.init_from": os.fspath(directory)}, resources=a.resources)
            for a in arms]
