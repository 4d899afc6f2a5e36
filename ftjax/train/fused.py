"""Many arms, one program: the arms of a sweep that compile to the same step, trained together.

Arms whose configs differ only in traced values (``FUSABLE``: learning rate, weight decay, Adam
moments, seed, LoRA alpha, rank and dropout rate) share one model graph. Each arm is built as its own run
would be (same seed, same init, same data order); then its trainable parameters and optimizer
state are stacked on a leading ``arm`` axis and ``train.step``'s pure step is ``vmap``-ped over
it. The frozen backbone is kept once and shared: a frozen leaf that differs between arms (a
LoRA scale for another alpha, a LoRA dropout's keep probability) is stacked, every other one is unbatched, so with a shared batch
the backbone forward of head-only arms is computed once. A lower LoRA rank is zero-padded to the
group's largest and its gradient masked, so its padding stays exactly zero and the arm trains as
a run at its own rank. Batches are shared when every arm has the same seed (same data order and
dropout keys), else stacked per arm; on a CPU, arms with their own batches then step one after
another inside the program (``arms_per_pass``): same results, one arm's activations in memory.

On a mesh with an ``arm`` axis (``sharding.make_mesh(arms=K)``) the stacked axis is split over
it: each group of devices holds its arms' state, the frozen weights sharded inside it as usual.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax import sharding
from ftjax.errors import FtjaxError
from ftjax.train import memory, optim
from ftjax.train.checkpoint import abstract_like
from ftjax.train.experiment import Experiment, build
from ftjax.train.fused_plan import FUSABLE, program_key
from ftjax.train.loop import init_state
from ftjax.train.step import TrainState, make_train_step

# Only these parameters may differ in shape between arms (a lower LoRA rank, zero-padded).
PADDABLE = ("lora_a", "lora_b")


class FusedError(FtjaxError, ValueError):
    """Arms that cannot be trained as one program."""


class FusedMemoryError(memory.MemoryBudgetError):
    """A fused group larger than the device holds; ``fit`` arms would (0: not even one)."""

    def __init__(self, message: str, fit: int):
        super().__init__(message)
        self.fit = fit


def arm_shards(num_arms: int, num_devices: int) -> int:
    """Size of the ``arm`` mesh axis: the most device groups the arms split over evenly."""
    return math.gcd(num_arms, num_devices)


def fused_mesh(config: ml_collections.ConfigDict, num_arms: int) -> Mesh:
    devices = jax.devices()[:config.mesh.num_devices] if config.mesh.num_devices else jax.devices()
    sizes = {k: v for k, v in config.mesh.items() if k != "num_devices"}
    return sharding.make_mesh(sizes, devices, arms=arm_shards(num_arms, len(devices)))


def arms_per_pass(num_arms: int, shared_batch: bool, shards: int, platform: str) -> int:
    """How many arms one pass of the fused step computes together.

    All of them (``vmap``) on an accelerator, where a bigger batch fills the chip; when they share
    a batch (the frozen backbone's forward is computed once for all); or when the ``arm`` axis
    is split over devices. On a CPU with per-arm batches, one at a time (``lax.map``): the
    step is compute-bound there, so batching the arms saves nothing and would hold every arm's
    activations at once.
    """
    return 1 if platform == "cpu" and not shared_batch and shards == 1 else num_arms


def budget(est: memory.MemoryEstimate, num_arms: int, shards: int, per_pass: int = 0
           ) -> tuple[int, int]:
    """(per-device bytes of ``num_arms`` fused arms, how many arms fit) from one arm's estimate.

    The frozen weights count once; each arm a device holds (``ceil(num_arms / shards)``) keeps
    its trainable params and optimizer state; gradients and activations count once per arm
    computed in the same pass (``per_pass``, 0: all the device holds).
    """
    kept, passing = est.grads + est.optimizer, est.grads + est.activations
    shared = est.params - est.grads
    held = math.ceil(num_arms / shards)
    together = min(per_pass or held, held)
    total = shared + held * kept + together * passing
    if est.limit is None:
        fit = num_arms
    elif together < held:  # arms pass one group at a time: each more arm costs its kept state
        fit = shards * max(0, (est.limit - shared - together * passing) // kept)
    else:
        fit = shards * max(0, (est.limit - shared) // (kept + passing))
    return total, int(fit)


def _check_budget(est: memory.MemoryEstimate, num_arms: int, shards: int, per_pass: int = 0
                  ) -> None:
    total, fit = budget(est, num_arms, shards, per_pass)
    if fit >= num_arms:
        return
    if not fit:
        memory.check(est)  # one arm alone does not fit: the single run's refusal and suggestions
    raise FusedMemoryError(
        f"a fused group of {num_arms} arms needs ~{total / memory.GIB:.2f} GiB per device (frozen "
        f"weights once, trainable state and activations per arm) but the device has "
        f"{est.limit / memory.GIB:.2f} GiB; at most {fit} fit: use --fuse=max_arms={fit}", fit)


@dataclasses.dataclass
class Arm:
    """One arm of a fused group: what its own run would have."""
    name: str
    config: ml_collections.ConfigDict
    workdir: epath.Path
    pipe: Any
    template: Any  # abstract TrainState of the arm alone (its own shapes) on the fused mesh
    num_trainable: int
    num_total: int


@dataclasses.dataclass
class Group:
    """The arms' stacked state and what the fused step and the per-arm views need."""
    arms: list[Arm]
    exp: Experiment  # the arm with the largest parameters: graph, mesh, kind, plan, tokenizer
    tx: optax.GradientTransformation
    state: TrainState  # params / opt_state stacked; step shared; rng stacked unless shared_rng
    frozen_def: Any  # treedef of the frozen state
    shared_frozen: list  # frozen leaves, None where the leaf differs between arms
    arm_frozen: dict[str, jax.Array]  # leaf index -> leaf stacked over arms
    masks: dict[str, jax.Array]  # params leaf index -> stacked 0/1 mask of the arm's own rank
    shared_batch: bool  # every arm has the same seed: one data stream, one dropout key

    @property
    def mesh(self) -> Mesh:
        return self.exp.mesh

    @property
    def size(self) -> int:
        return len(self.arms)


def _leaf_paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _stack(leaves: Sequence[jax.Array], shape: tuple[int, ...], mesh: Mesh) -> jax.Array:
    """Zero-pad each arm's leaf to ``shape`` and stack them on a leading ``arm`` axis."""
    spec = leaves[0].sharding.spec if isinstance(leaves[0].sharding, NamedSharding) else P()
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    arm = sharding.logical_to_spec(("arm",), (len(leaves),), mesh)[0]
    target = NamedSharding(mesh, P(arm, *spec))
    pads = [[(0, s - d) for s, d in zip(shape, x.shape)] for x in leaves]
    return jax.jit(lambda *xs: jnp.stack([jnp.pad(x, p) if any(b for _, b in p) else x
                                          for x, p in zip(xs, pads)]),
                   out_shardings=target)(*leaves)


def _stack_trees(trees: Sequence[Any], mesh: Mesh, what: str) -> tuple[Any, list[tuple[int, ...]]]:
    """Stack per-arm pytrees leaf by leaf (padding ``PADDABLE`` leaves to the largest shape);
    also returns the padded leaves' shapes per leaf (for the masks)."""
    defs = {jax.tree.structure(t) for t in trees}
    if len(defs) > 1:
        raise FusedError(f"fused arms have different {what} structures; run them separately (--fuse=off)")
    per_leaf = list(zip(*[jax.tree.leaves(t) for t in trees]))
    paths = _leaf_paths(trees[0])
    out = []
    for path, leaves in zip(paths, per_leaf):
        shape = tuple(max(dims) for dims in zip(*[x.shape for x in leaves]))
        if any(x.shape != shape for x in leaves) and not any(k in path for k in PADDABLE):
            raise FusedError(f"fused arms differ in the shape of {what} {path} "
                             f"({sorted({x.shape for x in leaves})}); run them separately (--fuse=off)")
        out.append(_stack(leaves, shape, mesh))
    return jax.tree.unflatten(jax.tree.structure(trees[0]), out), [x.shape[1:] for x in out]


def build_group(arms: Sequence[tuple[str, ml_collections.ConfigDict, epath.Path]]) -> Group:
    """Build every arm as its own run would (one at a time: one model in memory beyond the
    reference) and stack them. Raises FusedError / FusedMemoryError when they cannot fuse."""
    keys = {program_key(c) for _, c, _ in arms}
    if None in keys or len(keys) > 1:
        raise FusedError(f"arms {[n for n, _, _ in arms]} differ outside {FUSABLE} (or use a "
                         "regulariser); they cannot be fused: run them separately (--fuse=off)")
    # The largest LoRA rank first: that arm's graph, shapes and frozen weights are the group's.
    arms = sorted(arms, key=lambda a: -int(a[1].method.lora.rank))
    mesh = fused_mesh(arms[0][1], len(arms))
    shards = mesh.shape.get(sharding.ARM_AXIS, 1)
    out: list[Arm] = []
    states, ref, ref_tx, differs = [], None, None, set()
    own_frozen: list[dict[int, jax.Array]] = []  # per arm: its leaves that differ from arm 0's
    for i, (name, config, workdir) in enumerate(arms):
        exp = build(config, mesh=mesh)
        if exp.plan.step_hook is not None:
            raise FusedError(f"arm {name!r}: method {config.method.kind!r} keeps state its own train "
                             "step updates, so its arms train one at a time")
        tx = optim.make_optimizer(config.train, **exp.plan.optimizer_kwargs())
        if i == 0:
            ref, ref_tx = exp, tx
            per_pass = arms_per_pass(len(arms), len({c.train.seed for _, c, _ in arms}) == 1,
                                     shards, mesh.devices.flat[0].platform)
            _check_budget(memory.for_experiment(exp, tx), len(arms), shards, per_pass)
        state = init_state(exp, tx)
        if jax.tree.structure(exp.frozen) != jax.tree.structure(ref.frozen):
            raise FusedError(f"arm {name!r} has a different frozen state than {arms[0][0]!r}; "
                             "run them separately (--fuse=off)")
        mine = {}
        for j, (a, b) in enumerate(zip(jax.tree.leaves(ref.frozen), jax.tree.leaves(exp.frozen))):
            if a.shape != b.shape:
                raise FusedError(f"arm {name!r}: frozen {_leaf_paths(exp.frozen)[j]} has shape "
                                 f"{b.shape}, not {a.shape}; run the arms separately (--fuse=off)")
            if i and not bool(jnp.array_equal(a, b)):
                differs.add(j)
                mine[j] = b
        own_frozen.append(mine)
        states.append(state)
        out.append(Arm(name, config, epath.Path(workdir), exp.pipe, abstract_like(state),
                       exp.num_trainable, exp.num_total))
        del exp, mine  # this arm's model: only its differing frozen leaves stay
    seeds = {c.train.seed for _, c, _ in arms}
    state, shapes = _stack_states(states, mesh, shared_rng=len(seeds) == 1)
    masks = {}
    for j, shape in enumerate(shapes):
        own = [jax.tree.leaves(s.params)[j].shape for s in states]
        if any(o != shape for o in own):
            masks[str(j)] = _stack([jnp.ones(o, jnp.float32) for o in own], shape, mesh)
    frozen0 = jax.tree.leaves(ref.frozen)
    shared = [None if j in differs else x for j, x in enumerate(frozen0)]
    arm_frozen = {str(j): _stack([f.get(j, frozen0[j]) for f in own_frozen], frozen0[j].shape, mesh)
                  for j in sorted(differs)}
    return Group(arms=out, exp=ref, tx=ref_tx, state=state, frozen_def=jax.tree.structure(ref.frozen),
                 shared_frozen=shared, arm_frozen=arm_frozen, masks=masks,
                 shared_batch=len(seeds) == 1)


def merge_frozen(group: Group, shared: list, arm_frozen: dict) -> Any:
    """One arm's frozen state from the shared leaves and its own (``arm_frozen``, unstacked)."""
    leaves = [arm_frozen[str(j)] if x is None else x for j, x in enumerate(shared)]
    return jax.tree.unflatten(group.frozen_def, leaves)


def make_fused_step(group: Group):
    """``jit(step(state, shared_frozen, arm_frozen, batch) -> (state, metrics))``: ``train.step``
    vmapped over the arms (or mapped over them ``arms_per_pass`` at a time), each metric
    ``[arms]``."""
    exp, c = group.exp, group.arms[0].config

    def one(state, shared, arm_frozen, batch, masks):
        def mask_grads(grads, step):
            leaves = [g * masks[str(j)] if str(j) in masks else g
                      for j, g in enumerate(jax.tree.leaves(grads))]
            return jax.tree.unflatten(jax.tree.structure(grads), leaves)

        step = make_train_step(exp.graphdef, group.tx, kind=exp.kind, grad_accum=c.train.grad_accum,
                               schedule=optim.schedule_shape(c.train),
                               grad_mask_fn=mask_grads if masks else None,
                               num_tasks=exp.pipe.info.num_tasks,
                               loss_chunk=c.train.loss_chunk)
        return step(state, merge_frozen(group, shared, arm_frozen), batch)

    per_pass = arms_per_pass(group.size, group.shared_batch, group.mesh.shape.get(sharding.ARM_AXIS, 1),
                             group.mesh.devices.flat[0].platform)
    if per_pass == group.size:
        axes = TrainState(step=None, params=0, opt_state=0, rng=None if group.shared_batch else 0)
        fused = jax.vmap(one, in_axes=(axes, None, 0, None if group.shared_batch else 0, 0),
                         out_axes=(axes, 0))
    else:  # per-arm batches and rng: every input but the step is per arm
        def fused(s, shared, arm_frozen, batch, masks):
            def arm(x):
                params, opt_state, rng, own_frozen, own_batch, own_masks = x
                new, metrics = one(TrainState(s.step, params, opt_state, rng), shared, own_frozen,
                                   own_batch, own_masks)
                return (new.step, new.params, new.opt_state, new.rng), metrics
            (step, params, opt_state, rng), metrics = jax.lax.map(
                arm, (s.params, s.opt_state, s.rng, arm_frozen, batch, masks), batch_size=per_pass)
            return TrainState(step[0], params, opt_state, rng), metrics
    state_sh = jax.tree.map(lambda x: x.sharding, group.state)
    return jax.jit(lambda s, shared, arm_frozen, batch: fused(s, shared, arm_frozen, batch, group.masks),
                   in_shardings=(state_sh, None, None, None), out_shardings=(state_sh, None),
                   donate_argnums=(0,))


def shard_batches(group: Group, batches: Sequence[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
    """One shared batch (split over data x fsdp), or the arms' batches stacked over ``arm``."""
    if group.shared_batch:
        return sharding.shard_batch(batches[0], group.mesh)
    arm = sharding.logical_to_spec(("arm",), (group.size,), group.mesh)[0]
    out = {}
    for k in batches[0]:
        x = np.stack([b[k] for b in batches])
        target = NamedSharding(group.mesh, P(arm, *sharding.batch_spec(x.ndim - 1)))
        out[k] = jax.make_array_from_process_local_data(target, x)
    return out


def _take(x: jax.Array, i: int, target: Any) -> jax.Array:
    """Arm ``i``'s slice of a stacked leaf, cut to ``target``'s shape, on ``target``'s sharding."""
    x = x[i]
    if x.shape != tuple(target.shape):
        x = x[tuple(slice(0, s) for s in target.shape)]
    return jax.device_put(x, target.sharding)


def arm_state(group: Group, i: int) -> TrainState:
    """Arm ``i``'s TrainState as its own run holds it."""
    t = group.arms[i].template
    s = group.state
    rng = s.rng if group.shared_batch else jax.device_put(s.rng[i], t.rng.sharding)
    return TrainState(step=jax.device_put(s.step, t.step.sharding),
                      params=jax.tree.map(lambda x, y: _take(x, i, y), s.params, t.params),
                      opt_state=jax.tree.map(lambda x, y: _take(x, i, y), s.opt_state, t.opt_state),
                      rng=rng)


def _stack_states(states: Sequence[TrainState], mesh: Mesh, shared_rng: bool
                  ) -> tuple[TrainState, list[tuple[int, ...]]]:
    """The arms' states stacked (step shared; rng too when ``shared_rng``), and the padded
    parameter shapes."""
    params, shapes = _stack_trees([s.params for s in states], mesh, "parameter")
    opt_state, _ = _stack_trees([s.opt_state for s in states], mesh, "optimizer state")
    rng = states[0].rng if shared_rng else _stack([s.rng for s in states], states[0].rng.shape, mesh)
    return TrainState(step=states[0].step, params=params, opt_state=opt_state, rng=rng), shapes


def set_state(group: Group, states: Sequence[TrainState]) -> None:
    """Replace the group's state by the arms' own (restored) states, stacked."""
    state, _ = _stack_states(states, group.mesh, group.shared_batch)
    group.state = state.replace(step=jax.device_put(state.step, group.state.step.sharding))
