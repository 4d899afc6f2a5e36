"""Plan a run before making it: per method (or sweep arm), what trains, the memory per device,
the FLOPs per step and the time for the configured steps on a target machine, and whether it fits.

Nothing is loaded or allocated where shapes suffice: the model is built under ``nnx.eval_shape``
from its config (a HF folder's config.json, a .gguf file's metadata, a preset), the method applied
to the abstract model, and the estimates read off the shapes: memory from ``memory.estimate``
on an abstract mesh of the target's devices, FLOPs from ``flops.step_flops``. A method whose setup
needs values (prompt tuning draws vocabulary rows, QLoRA quantises, PiSSA takes an SVD) is set up
on a randomly initialised model instead, never the checkpoint's weights.

    time = steps * FLOPs per step / (devices * peak FLOP/s per device * MFU)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from ftjax import models, peft, sharding
from ftjax.errors import FtjaxError
from ftjax.models import loading, registry
from ftjax.models.registry import count_params
from ftjax.train import memory, optim
from ftjax.train.experiment import ConfigError, check_batch, tokenizer_source
from ftjax.train.flops import StepFlops, step_flops
from ftjax.train.hardware import Hardware
from ftjax.train.step import LOSS_KINDS


class PlanError(FtjaxError, ValueError):
    """A config the planner cannot size without downloading or loading it."""


@dataclasses.dataclass(frozen=True)
class Row:
    """The plan of one arm on one target."""
    name: str
    method: str
    trainable: int = 0
    total: int = 0
    memory: memory.MemoryEstimate | None = None  # None: the method cannot take this model
    flops: StepFlops | None = None
    seconds: float = 0.0  # config.train.steps at the MFU
    note: str = ""  # why it cannot run as configured (the method's error, a batch that does not split)

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory.fits and not self.note


def _model_spec(model_cfg: ml_collections.ConfigDict, num_labels: int) -> tuple[Any, Any, str, int]:
    """(family, model config, head, num_labels) from the source's config alone, no weights."""
    fields = models.model_fields(model_cfg)
    source, head = model_cfg.source, model_cfg.head
    if source in registry.PRESETS:
        family, cfg = registry.get_preset(source)
        return family, loading.replace_config(family, cfg, **fields), head, num_labels
    path = Path(source)
    if path.suffix == ".gguf" and path.is_file():
        from ftjax.models import gguf_io
        d, _ = gguf_io.read_gguf(path)
    elif path.is_dir():
        d = loading.folder_config(path)
    else:
        raise PlanError(f"config.model.source={source!r}: the planner reads a local folder, a .gguf "
                        f"file or a preset ({', '.join(sorted(registry.PRESETS))}); download it first")
    dtypes = {k: fields.pop(k) for k in ("dtype", "param_dtype")}
    return loading.model_config(d, head, num_labels, overrides=fields, **dtypes)


def _num_labels(config: ml_collections.ConfigDict, tokenizer: Any) -> int:
    if config.model.num_labels or config.model.head not in ("sequence_classification",
                                                             "token_classification"):
        return config.model.num_labels
    from ftjax.data import pipeline  # the label set is the data's (prepared once, then cached)
    if tokenizer is None:
        raise PlanError(f"config.model.source={config.model.source!r} has no tokenizer to read the "
                        "labels with; set config.data.tokenizer or config.model.num_labels")
    return pipeline.build(config.data, tokenizer, seed=config.train.seed).info.num_labels


def abstract_model(config: ml_collections.ConfigDict, tokenizer: Any, num_labels: int,
                   say: Callable[[str], None] = print) -> tuple[nnx.Module, peft.MethodPlan]:
    """The model with ``config.method`` applied, as shapes (see the module docstring)."""
    family, cfg, head, num_labels = _model_spec(config.model, num_labels)
    plans = []

    def build():
        model = family.build(cfg, head, num_labels, nnx.Rngs(config.train.seed))
        plans.append(peft.apply_method(model, config.method, tokenizer))
        return plans[-1].model

    try:
        return nnx.eval_shape(build), plans[-1]
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
            jax.errors.TracerBoolConversionError):
        say(f"  {config.method.kind}: its setup needs values; building it with random weights")
        mesh = sharding.make_mesh({"fsdp": -1}, jax.devices()[:1])
        model = registry.init_sharded(lambda r: family.build(cfg, head, num_labels, r), mesh,
                                      config.train.seed)
        plan = peft.apply_method(model, config.method, tokenizer)
        return plan.model, plan


def target_mesh(config: ml_collections.ConfigDict, devices: int) -> AbstractMesh:
    sizes = {k: v for k, v in config.mesh.items() if k != "num_devices"}
    shape = sharding.resolve_mesh_shape(sizes, min(config.mesh.num_devices or devices, devices))
    return AbstractMesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def plan_arm(name: str, config: ml_collections.ConfigDict, hw: Hardware, mfu: float,
             tokenizer: Any, num_labels: int, say: Callable[[str], None] = print) -> Row:
    """One row: ``config`` (an arm's, overrides applied) on ``hw`` at ``mfu``."""
    try:
        model, plan = abstract_model(config, tokenizer, num_labels, say)
    except ValueError as e:  # the method cannot take this model (head-only on a tied LM head)
        return Row(name=name, method=config.method.kind, note=str(e))
    _, params, frozen = nnx.split(model, plan.trainable, ...)
    mesh = target_mesh(config, hw.devices)
    note = ""
    try:
        check_batch(config, mesh)
    except ConfigError as e:
        note = str(e)
    t = config.train
    tx = optim.make_optimizer(t, **plan.optimizer_kwargs())
    facts = memory.method_facts(model, plan.trainable, frozen, LOSS_KINDS[config.model.head])
    est = memory.estimate(params, frozen, tx, mesh, model.model.cfg, batch_size=t.batch_size,
                          seq_len=config.data.seq_len, remat=config.model.remat,
                          grad_accum=t.grad_accum, limit=hw.memory_bytes, loss_chunk=t.loss_chunk,
                          **facts)
    fl = step_flops(model, plan.trainable, t.batch_size, config.data.seq_len)
    peak = hw.peak(config.model.dtype) * mesh.size * mfu
    return Row(name=name, method=config.method.kind, trainable=count_params(params),
               total=peft.total_weights(model), memory=est, flops=fl,
               seconds=t.steps * fl.total / peak, note=note)


def plan(arms: list[tuple[str, ml_collections.ConfigDict]], hw: Hardware, mfu: float,
         say: Callable[[str], None] = print) -> list[Row]:
    """Rows for every ``(name, config)``; the tokenizer and label count are read once."""
    first = arms[0][1]
    source = tokenizer_source(first)
    tokenizer = None
    if source:
        from ftjax.data import pipeline
        tokenizer = pipeline.load_tokenizer(first.data, source)
    num_labels = _num_labels(first, tokenizer)
    rows = []
    for name, config in arms:
        say(f"planning {name} ({config.method.kind})")
        rows.append(plan_arm(name, config, hw, mfu, tokenizer, num_labels, say))
    return rows


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.3g} s"


def format_table(rows: list[Row], hw: Hardware, mfu: float, steps: int, dtype: str) -> str:
    """A markdown table, with the assumptions above it."""
    limit = f"{hw.memory_bytes / memory.GIB:.1f} GiB" if hw.memory_bytes else "unknown"
    head = (f"{hw.name}: {hw.devices} device(s), {hw.peak(dtype) / 1e12:.3g} {dtype} TFLOP/s and "
            f"{limit} per device, MFU {mfu:g}; {steps} steps\n\n"
            "| arm | method | trainable params | memory/device GiB | step TFLOP "
            "(6N / 4N / 2N / attn) | time | fits |\n|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if r.memory is None:
            lines.append(f"| {r.name} | {r.method} | | | | | no: {r.note.splitlines()[0]} |")
            continue
        f = r.flops
        split = " / ".join(f"{x / 1e12:.3g}" for x in
                           (f.trained, f.frozen_backward, f.frozen_forward, f.attention))
        fits = "yes" if r.fits else ("no: " + (r.note.splitlines()[0] if r.note else
                                               f"needs {r.memory.total / memory.GIB:.2f} GiB"))
        lines.append(f"| {r.name} | {r.method} | {r.trainable:,} ({100 * r.trainable / r.total:.2f}%)"
                     f" | {r.memory.total / memory.GIB:.3f} | {f.total / 1e12:.3g} ({split}) | "
                     f"{_duration(r.seconds)} | {fits} |")
    return head + "\n".join(lines)
