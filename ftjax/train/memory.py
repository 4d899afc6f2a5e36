"""Per-device memory of a training run, estimated before it starts, and a refusal if it won't fit.

Parameters (trainable and frozen), gradients (one per trainable parameter) and optimizer state
are counted exactly from shapes — ``jax.eval_shape`` of the optimizer's ``init``, so nothing is
allocated — each divided by its sharding on the mesh. Activations kept for the backward pass are
estimated from the architecture, the per-device micro-batch and the remat policy:

    per layer and token (elements, compute dtype; attention scores in float32)
      none / save_everything: 4D + 3(N + K)H + 4F + 2NT
      dots:                   3D + 2(N + K)H + 2F + NT
      dots_no_batch:          3D + (N + 2K)H + 2F
      full:                   D   (+ one layer's 'none' set, rebuilt during its backward pass)
    once per token: the float32 logits and their gradient (2 x 4V bytes); with the LM loss in
      chunks of C positions (config.train.loss_chunk) only one chunk's: B x min(C, T) tokens.
      LM heads only: a classifier's logits are [B, labels] (not counted)
    when nothing in or below the layers trains (a linear probe) they run forward only: one
      layer's 'none' set and the hidden state (D) at a time

with D the width, F the MLP width, N/K query/key-value heads of size H, T the sequence length.
Head-, MLP- and vocabulary-sized terms are divided by the ``tensor`` axis. XLA's own temporaries
add to this, so the estimate is a floor, not a bound; the train loop prints it and refuses a
run whose estimate already exceeds the device (``memory_stats()['bytes_limit']``, or on CPU the
host memory this process could use, split over the local devices).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax import sharding
from ftjax.errors import FtjaxError
from ftjax.train import flops

GIB = 1024 ** 3
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")


class MemoryBudgetError(FtjaxError, ValueError):
    """The run's estimated per-device memory exceeds what the device has."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, with what a suggestion needs to say how much it would save."""
    params: int  # every parameter and frozen buffer the step holds (trainable + frozen)
    grads: int
    optimizer: int
    activations: int
    limit: int | None  # bytes available per device; None when unknown
    remat: str
    activations_by_remat: dict[str, int]
    trains_everything: bool
    batch_per_device: int
    grad_accum: int
    model_shards: int  # devices a parameter is split over at most (fsdp x tensor)
    devices: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    @property
    def fits(self) -> bool:
        return self.limit is None or self.total <= self.limit

    def summary(self) -> str:
        limit = f" of {self.limit / GIB:.2f} GiB available" if self.limit else ""
        return (f"memory per device (estimate): params {self.params / GIB:.2f} GiB + grads "
                f"{self.grads / GIB:.2f} + optimizer {self.optimizer / GIB:.2f} + activations "
                f"{self.activations / GIB:.2f} (batch {self.batch_per_device}/device, remat "
                f"{self.remat!r}) = {self.total / GIB:.2f} GiB{limit}")

    def suggestions(self) -> list[str]:
        """Config changes that shrink the estimate, each with the total it would come to."""
        out, gib = [], lambda b: f"{b / GIB:.2f} GiB"
        state = self.params + self.grads + self.optimizer
        if self.model_shards < self.devices:
            shrunk = state * self.model_shards // self.devices + self.activations
            out.append(f"shard parameters, gradients and optimizer state over all {self.devices} "
                       f"devices (config.mesh.fsdp=-1, data=1): ~{gib(shrunk)}")
        known = self.remat in REMAT_ORDER
        for policy in REMAT_ORDER[REMAT_ORDER.index(self.remat) + 1:] if known else ():
            saved = self.activations - self.activations_by_remat[policy]
            if saved > 0:
                out.append(f"recompute activations (config.model.remat={policy!r}): "
                           f"~{gib(self.total - saved)}")
        if self.batch_per_device > 1:
            halved = self.activations // 2
            out.append(f"halve the micro-batch (config.train.grad_accum={2 * self.grad_accum}, "
                       f"same global batch): ~{gib(self.total - halved)}")
        if self.trains_everything:
            out.append(f"train a LoRA adapter instead of every weight (config.method.kind='lora'; "
                       f"no gradients or optimizer state for frozen weights): "
                       f"~{gib(self.params + self.activations)}")
        return out


def array_bytes(shape: tuple[int, ...], dtype: Any, target: NamedSharding | None) -> int:
    """Bytes one device holds of an array of ``shape`` laid out as ``target`` (None: whole)."""
    local = target.shard_shape(tuple(shape)) if target is not None else shape
    # A typed PRNG key (threefry) is two uint32 words.
    itemsize = 8 if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else np.dtype(dtype).itemsize
    return int(math.prod(local)) * itemsize


def state_bytes(state: Any, mesh: Mesh) -> int:
    """Per-device bytes of an ``nnx.State`` (concrete or abstract) sharded by its logical axes."""
    leaves = jax.tree.leaves(state)
    targets = jax.tree.leaves(sharding.state_shardings(state, mesh))
    return sum(array_bytes(np.shape(x), x.dtype, t) for x, t in zip(leaves, targets))


def optimizer_bytes(tx: optax.GradientTransformation, params: Any, mesh: Mesh) -> int:
    """Per-device bytes of ``tx.init(params)``: moments laid out like their parameters."""
    abstract = jax.eval_shape(tx.init, params)
    targets = sharding.state_shardings(params, mesh)
    replicated = NamedSharding(mesh, P())
    sizes = optax.tree_map_params(
        tx, lambda x, t: array_bytes(x.shape, x.dtype, t), abstract, targets,
        transform_non_params=lambda x: array_bytes(np.shape(x), x.dtype, replicated),
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return sum(jax.tree.leaves(sizes))


def activation_bytes(arch: Any, batch: int, seq_len: int, remat: str, tensor: int = 1,
                     loss_chunk: int = 0, *, vocab_logits: bool = True,
                     stack_backward: bool = True) -> int:
    """Activations kept for the backward pass (see the module docstring), per device.

    ``vocab_logits=False``: a classifier's head (logits [B, labels], not counted);
    ``stack_backward=False``: nothing in or below the layers trains (a linear probe), so they run
    forward only and hold one layer's set and the hidden state it hands on at a time.
    """
    d, layers = arch.hidden_size, arch.num_layers
    f = getattr(arch, "intermediate_size", None) or 4 * d
    n = arch.num_heads
    k = getattr(arch, "num_kv_heads", None) or n
    h = getattr(arch, "resolved_head_dim", None) or getattr(arch, "head_dim", None) or d // n
    nt = n * seq_len
    if tensor > 1:
        f, n, k, nt = f / tensor, n / tensor, k / tensor, nt / tensor
    width = np.dtype(getattr(arch, "dtype", "float32")).itemsize
    full_set = (4 * d + 3 * (n + k) * h + 4 * f) * width + 2 * nt * 4
    per_layer = {"none": full_set, "save_everything": full_set,
                 "dots": (3 * d + 2 * (n + k) * h + 2 * f + nt) * width,
                 "dots_no_batch": (3 * d + (n + 2 * k) * h + 2 * f) * width,
                 "full": d * width}
    if remat not in per_layer:
        raise ValueError(f"unknown remat policy {remat!r}; choose from {sorted(per_layer)}")
    rebuilt = full_set if remat in ("dots", "dots_no_batch", "full") else 0  # one layer's backward
    stored = layers * per_layer[remat] + rebuilt if stack_backward else full_set + d * width
    logits = 2 * 4 * arch.vocab_size / tensor if vocab_logits else 0
    logit_positions = min(loss_chunk, seq_len) if loss_chunk > 0 else seq_len
    return int(batch * (seq_len * stored + logit_positions * logits))


def device_limit(device: Any = None) -> int | None:
    """Bytes one device may use: ``memory_stats()['bytes_limit']``, or on CPU the memory this
    process could use (available + its own resident set) split over the local devices."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        import psutil
        usable = psutil.virtual_memory().available + psutil.Process().memory_info().rss
        return usable // len(jax.local_devices())
    return None


def estimate(params: Any, frozen: Any, tx: optax.GradientTransformation, mesh: Mesh, arch: Any, *,
             batch_size: int, seq_len: int, remat: str = "none", grad_accum: int = 1,
             trains_everything: bool = False, limit: int | None = None,
             loss_chunk: int = 0, vocab_logits: bool = True,
             stack_backward: bool = True) -> MemoryEstimate:
    """Estimate per-device memory of training ``params`` (with ``frozen`` alongside) by ``tx``.

    ``batch_size`` is the global batch of one optimizer step (split into ``grad_accum``
    micro-batches, each over the mesh's data x fsdp axes). ``arch`` is the model's architecture
    config (width, layers, heads, vocabulary); ``loss_chunk`` is ``config.train.loss_chunk``;
    ``vocab_logits`` and ``stack_backward`` as in :func:`activation_bytes` (see ``for_experiment``).
    """
    trainable = state_bytes(params, mesh)
    batch = max(1, batch_size // grad_accum // sharding.batch_divisor(mesh))
    tensor = mesh.shape["tensor"]
    def acts(policy: str) -> int:
        return activation_bytes(arch, batch, seq_len, policy, tensor, loss_chunk,
                                vocab_logits=vocab_logits, stack_backward=stack_backward)

    return MemoryEstimate(
        params=trainable + state_bytes(frozen, mesh), grads=trainable,
        optimizer=optimizer_bytes(tx, params, mesh), activations=acts(remat), limit=limit,
        remat=remat, activations_by_remat={r: acts(r) for r in REMAT_ORDER},
        trains_everything=trains_everything,
        batch_per_device=batch, grad_accum=grad_accum,
        model_shards=mesh.shape["fsdp"] * tensor, devices=mesh.size)


def for_experiment(exp: Any, tx: optax.GradientTransformation) -> MemoryEstimate:
    """The estimate for a built ``Experiment`` on its mesh, against this device's limit."""
    c = exp.config
    arch = getattr(exp.model, "model", exp.model).cfg
    return estimate(exp.params, exp.frozen, tx, exp.mesh, arch, batch_size=c.train.batch_size,
                    seq_len=c.data.seq_len, remat=c.model.remat, grad_accum=c.train.grad_accum,
                    limit=device_limit(), loss_chunk=c.train.loss_chunk,
                    **method_facts(exp.model, exp.plan.trainable, exp.frozen, exp.kind))


def method_facts(model: nnx.Module, trainable: Any, frozen: Any, kind: str) -> dict[str, bool]:
    """``estimate``'s keywords that depend on the method and head: whether every weight trains,
    whether the loss has vocabulary logits (an LM), whether the layers run backward."""
    return dict(trains_everything=not jax.tree.leaves(nnx.filter_state(frozen, nnx.Param)),
                vocab_logits=kind == "lm",
                stack_backward=flops.lowest_trainable(model, trainable) <= flops.STACK)


def check(est: MemoryEstimate) -> None:
    """Raise :class:`MemoryBudgetError` with suggestions when the estimate exceeds the limit."""
    if est.fits:
        return
    tips = "\n".join(f"  - {s}" for s in est.suggestions()) or "  - use more or larger devices"
    raise MemoryBudgetError(
        f"this run needs ~{est.total / GIB:.2f} GiB per device but the device has "
        f"{est.limit / GIB:.2f} GiB.\n{est.summary()}\nTo fit, try:\n{tips}")
