"""Everything a run needs, built from a config: mesh, model, tokenizer, data, split state.

Checks that would otherwise surface as an XLA error deep inside a compile (mesh vs devices,
batch vs data axes, grad accumulation) run here first and say what to change.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from ftjax import models, peft, sharding
from ftjax.data import pipeline
from ftjax.errors import FtjaxError
from ftjax.models.registry import count_params
from ftjax.models.stack import REMAT_POLICIES
from ftjax.train import warm_start
from ftjax.train.step import LOSS_KINDS


class ConfigError(FtjaxError, ValueError):
    """A config that cannot work, found before any compile."""


@dataclasses.dataclass
class Experiment:
    config: ml_collections.ConfigDict
    mesh: Mesh
    model: nnx.Module
    tokenizer: Any
    pipe: Any
    graphdef: nnx.GraphDef
    params: nnx.State  # trainable
    frozen: nnx.State  # everything else
    kind: str  # lm | classification | token
    plan: peft.MethodPlan  # the fine-tuning method: trainable filter, masks, LR scales

    @property
    def num_trainable(self) -> int:
        return count_params(self.params)

    @property
    def num_total(self) -> int:
        return peft.total_weights(self.model)


def check_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The global batch must split evenly over data x fsdp, micro-batches and processes."""
    t = config.train
    divisor = sharding.batch_divisor(mesh)
    if t.loss_chunk < 0:
        raise ConfigError(f"config.train.loss_chunk={t.loss_chunk} must be >= 0 (positions per "
                          f"chunk of the LM loss; 0 = unchunked)")
    if t.grad_accum < 1:
        raise ConfigError(f"config.train.grad_accum={t.grad_accum} must be >= 1")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"config.train.batch_size={t.batch_size} is not divisible by "
                          f"config.train.grad_accum={t.grad_accum}")
    micro = t.batch_size // t.grad_accum
    if micro % divisor:
        raise ConfigError(
            f"micro-batch {micro} (config.train.batch_size / grad_accum) is not divisible by the "
            f"{divisor} data-parallel shards (mesh data x fsdp = {mesh.shape['data']} x "
            f"{mesh.shape['fsdp']}); use a batch size that is a multiple of {divisor * t.grad_accum}")
    if t.batch_size % jax.process_count():
        raise ConfigError(f"config.train.batch_size={t.batch_size} must divide over "
                          f"{jax.process_count()} processes")
    if config.eval.batch_size % divisor:
        raise ConfigError(f"config.eval.batch_size={config.eval.batch_size} is not divisible by the "
                          f"{divisor} data-parallel shards; use a multiple of {divisor}")


def tokenizer_source(config: ml_collections.ConfigDict) -> str | None:
    """config.data.tokenizer, else the model folder itself (HF folders carry their tokenizer)."""
    if config.data.tokenizer:
        return config.data.tokenizer
    return config.model.source if os.path.isdir(config.model.source) else None


def _pipeline(config: ml_collections.ConfigDict, tokenizer: Any) -> Any:
    return pipeline.build(config.data, tokenizer, process_index=jax.process_index(),
                          process_count=jax.process_count(), seed=config.train.seed)


def build(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Experiment:
    """Mesh -> checks -> data -> model (born sharded) -> method -> split (-> init_from weights).

    ``mesh`` (a fused run's, with an ``arm`` axis) replaces the one ``config.mesh`` describes.
    """
    if config.model.head not in LOSS_KINDS:
        raise ConfigError(f"config.model.head={config.model.head!r}; choose from {sorted(LOSS_KINDS)}")
    if config.model.remat not in REMAT_POLICIES:
        raise ConfigError(f"config.model.remat={config.model.remat!r}; choose from {sorted(REMAT_POLICIES)}")
    if mesh is None:
        sizes = {k: v for k, v in config.mesh.items() if k != "num_devices"}
        devices = jax.devices()[:config.mesh.num_devices] if config.mesh.num_devices else None
        mesh = sharding.make_mesh(sizes, devices)
    check_batch(config, mesh)
    # Data first when the tokenizer is known without the model: the label count sizes the head.
    source = tokenizer_source(config)
    tokenizer = pipeline.load_tokenizer(config.data, source) if source else None
    pipe = _pipeline(config, tokenizer) if tokenizer is not None else None
    num_labels = config.model.num_labels or (pipe.info.num_labels if pipe else 0)
    model, model_tokenizer = models.create(config.model, mesh, num_labels=num_labels,
                                           seed=config.train.seed)
    if pipe is None:
        tokenizer = model_tokenizer
        if tokenizer is None:
            raise ConfigError(f"model source {config.model.source!r} has no tokenizer; "
                              "set config.data.tokenizer to a tokenizer folder")
        pipe = _pipeline(config, tokenizer)
    plan = peft.apply_method(model, config.method, tokenizer)
    model = plan.model
    graphdef, params, frozen = nnx.split(model, plan.trainable, ...)
    if config.model.init_from:
        params, frozen = warm_start.restore_trained(params, frozen, config.model.init_from)
        nnx.update(model, params, frozen)
    return Experiment(config=config, mesh=mesh, model=model, tokenizer=tokenizer, pipe=pipe,
                      graphdef=graphdef, params=params, frozen=frozen,
                      kind=LOSS_KINDS[config.model.head], plan=plan)
