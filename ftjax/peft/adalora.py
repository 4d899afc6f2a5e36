"""AdaLoRA (Zhang et al. 2023): an SVD-shaped low-rank update whose rank budget shrinks while it
trains, the least important singular values masked to zero. PEFT 0.21's ``AdaLoraConfig``.

``y = x W + b + s (x (A * E)^T) B^T`` with PEFT's tensors and orientation: ``A [r, in]`` and
``B [out, r]`` (normal, std 0.02), the singular values ``E [r]`` (zero, so a fresh adapter changes
nothing; PEFT stores ``[r, 1]``), ``r = init_r`` and ``s = alpha / (init_r + 1e-5)`` (PEFT's
``scaling / (ranknum + 1e-5)``; ``ranknum`` stays ``init_r``).

Training adds PEFT's orthogonal regulariser ``orth_reg_weight * mean ||A A^T - I||_F, ||B^T B -
I||_F`` (over every layer's ``A`` and ``B``) to the loss, and after every optimizer update runs
PEFT's ``RankAllocator`` inside the jitted step (:class:`Allocator`, a ``plan.StepHook``): an EMA of
each adapter weight's sensitivity ``|w * grad|`` (``beta1``) and of its uncertainty (``beta2``);
every ``delta_t`` steps between ``tinit`` and ``total_step - tfinal`` the singular values of the
lowest ``init_bgt - budget`` triplets, over all layers together, are set to zero, the budget
falling cubically from ``init_r`` to ``target_r`` per matrix; at ``total_step - tfinal`` the final
pattern is fixed and then applied after every later step. The EMAs and the pattern are the
method's state in ``TrainState.method_state`` (checkpointed; a resume continues exactly).

PEFT export writes every layer at ``init_r`` with the masked singular values zero (no
``rank_pattern``); import also reads PEFT's pruned folders (``rank_pattern``, a rank per layer),
padding each layer back to ``init_r`` with zero triplets (the order of the triplets does not
change the output).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ftjax.models import layers
from ftjax.peft import lora, registry, surgery
from ftjax.peft.delta import DeltaLinear
from ftjax.peft.plan import Context, MethodConfigError, MethodPlan, StepHook, adapter_plan

FACTORS = ("lora_A", "lora_E", "lora_B")  # PEFT's tensor names


class AdaLoRALinear(DeltaLinear):
    """A Linear with an AdaLoRA update ``s B diag(E) A``; stacked like the kernel it adapts."""

    def __init__(self, base: layers.Linear, *, rank: int, alpha: float, key: jax.Array):
        super().__init__(base)
        kernel = base.kernel
        lead_shape, lead_axes = surgery.lead(kernel, 2)
        in_axis, out_axis = surgery.axes_of(kernel)[-2:]
        self.rank = rank
        scale = (alpha if alpha > 0 else rank) / (rank + 1e-5)  # PEFT: scaling / (ranknum + 1e-5)
        self.scaling = surgery.new_param(kernel, surgery.constant(scale), lead_shape, lead_axes,
                                         key, dtype=jnp.float32, cls=lora.LoRAScale)
        ka, kb = jax.random.split(key)
        self.lora_A = surgery.new_param(kernel, surgery.normal(0.02),
                                        lead_shape + (rank, self.in_features),
                                        lead_axes + ("lora_rank", in_axis), ka)
        self.lora_E = surgery.new_param(kernel, surgery.constant(0.0), lead_shape + (rank,),
                                        lead_axes + ("lora_rank",), key)
        self.lora_B = surgery.new_param(kernel, surgery.normal(0.02),
                                        lead_shape + (self.out_features, rank),
                                        lead_axes + (out_axis, "lora_rank"), kb)

    def delta(self) -> jax.Array:
        a, e, b = (getattr(self, n)[...].astype(jnp.float32) for n in FACTORS)
        prod = jnp.einsum("...ri,...r,...or->...io", a, e, b)
        return self.scaling[...][..., None, None] * prod

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.merged:
            return super().__call__(x)
        x = x.astype(self.dtype)
        a = (self.lora_A[...] * self.lora_E[...][..., None]).astype(self.dtype)
        b = self.lora_B[...].astype(self.dtype)
        s = self.scaling[...].astype(self.dtype)  # a scalar here: blocks run one layer at a time
        y = jnp.einsum("...i,io->...o", x, self.weight())
        update = jnp.einsum("...r,or->...o", jnp.einsum("...i,ri->...r", x, a), b)
        return self.add_bias(y + s * update)

    def peft_tensors(self) -> dict[str, np.ndarray]:
        """PEFT's ``lora_A [r, in]``, ``lora_E [r, 1]``, ``lora_B [out, r]`` (stacked axes kept)."""
        return {"lora_A": surgery.host(self.lora_A), "lora_E": surgery.host(self.lora_E)[..., None],
                "lora_B": surgery.host(self.lora_B)}

    def load_peft_tensors(self, read: Callable[[str, Callable], np.ndarray]) -> None:
        """Each layer's tensors, a pruned rank (PEFT's ``rank_pattern``) padded to ``init_r``."""
        def pad(axis: int) -> Callable[[np.ndarray], np.ndarray]:
            def to_rank(t: np.ndarray) -> np.ndarray:
                width = [(0, 0)] * t.ndim
                width[axis] = (0, max(self.rank - t.shape[axis], 0))
                return np.pad(np.asarray(t), width)
            return to_rank

        surgery.assign(self.lora_A, read("lora_A", pad(0)), "lora_A")
        surgery.assign(self.lora_E, read("lora_E", lambda t: pad(0)(t[:, 0])), "lora_E")
        surgery.assign(self.lora_B, read("lora_B", pad(1)), "lora_B")


# ---------------------------------------------------------------------------------------------
# the rank budget: PEFT's RankAllocator as a pure function of the train state
# ---------------------------------------------------------------------------------------------

def budget_schedule(step: int, init_bgt: int, target_bgt: int, a: ml_collections.ConfigDict
                    ) -> tuple[int, bool]:
    """(budget, whether to mask) at ``step``, as PEFT computes it (Python floats, so the
    truncation matches): ``init_bgt`` up to ``tinit``, then a cubic fall to ``target_bgt`` at
    ``total_step - tfinal``, masking every ``delta_t`` steps."""
    if step <= a.tinit:
        return init_bgt, False
    if step > a.total_step - a.tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - a.tinit) / (a.total_step - a.tfinal - a.tinit)
    return int((init_bgt - target_bgt) * (mul_coeff ** 3) + target_bgt), step % a.delta_t == 0


def _flat(tree: Any) -> dict[tuple, Any]:
    return {tuple(p): v for p, v in nnx.to_flat_state(tree)}


def _frobenius(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1)))


class Allocator:
    """The orthogonal regulariser and the rank allocation of the adapted layers at ``paths``.

    The state is one dict per layer (``paths`` order): ``ipt`` and ``unc`` (the EMAs of the
    sensitivity and of its uncertainty, per adapter tensor) and ``keep`` (``[..., r]``: the triplets
    the last allocation kept).
    """

    def __init__(self, paths: list[tuple], init_bgt: int, target_bgt: int,
                 a: ml_collections.ConfigDict):
        self.paths, self.init_bgt, self.target_bgt = sorted(paths), init_bgt, target_bgt
        self.beta1, self.beta2 = float(a.beta1), float(a.beta2)
        self.tinit, self.delta_t = int(a.tinit), int(a.delta_t)
        self.orth_reg_weight = float(a.orth_reg_weight)
        self.final = int(a.total_step - a.tfinal)  # the step that fixes the final pattern
        # PEFT's budget before ``final`` as a table: its float64 truncation, not float32's
        self.budgets = np.array([budget_schedule(s, init_bgt, target_bgt, a)[0]
                                 for s in range(self.final)], np.int32)

    def hook(self) -> StepHook:
        return StepHook(self.init, self.update, self.loss if self.orth_reg_weight else None)

    def init(self, params: Any) -> list[dict[str, Any]]:
        flat = _flat(params)
        like = lambda x, value, dtype: jax.device_put(jnp.full(x.shape, value, dtype), x.sharding)
        out = []
        for path in self.paths:
            values = {n: flat[path + (n,)].get_value() for n in FACTORS}
            out.append(dict(ipt={n: like(v, 0, jnp.float32) for n, v in values.items()},
                            unc={n: like(v, 0, jnp.float32) for n, v in values.items()},
                            keep=like(values["lora_E"], True, jnp.bool_)))
        return out

    def loss(self, params: Any) -> jax.Array:
        """``orth_reg_weight`` times the mean of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` over
        every layer's matrices (PEFT's ``AdaLoraModel.forward``)."""
        flat = _flat(params)
        norms = []
        for path in self.paths:
            a = flat[path + ("lora_A",)].get_value().astype(jnp.float32)
            b = flat[path + ("lora_B",)].get_value().astype(jnp.float32)
            eye = jnp.eye(a.shape[-2], dtype=jnp.float32)
            norms.append(_frobenius(jnp.einsum("...ri,...si->...rs", a, a) - eye))
            norms.append(_frobenius(jnp.einsum("...or,...os->...rs", b, b) - eye))
        count = sum(n.size for n in norms)
        return self.orth_reg_weight * sum(jnp.sum(n) for n in norms) / count

    @staticmethod
    def scores(state: dict[str, Any]) -> jax.Array:
        """Each triplet's importance ``[..., r]``: its singular value's score plus the mean score
        of its row of ``A`` and of its column of ``B`` (score = EMA x uncertainty)."""
        s = {n: state["ipt"][n] * state["unc"][n] for n in FACTORS}
        return s["lora_E"] + (jnp.mean(s["lora_A"], axis=-1) + jnp.mean(s["lora_B"], axis=-2))

    def update(self, params: Any, grads: Any, state: list[dict[str, Any]], step: jax.Array
               ) -> tuple[Any, list[dict[str, Any]]]:
        """PEFT's ``AdaLoraModel.update_and_allocate(step)`` after the optimizer's update."""
        flat, grad = _flat(params), _flat(grads)
        learning, final = step < self.final, step == self.final
        new = []
        for path, st in zip(self.paths, state):
            ipt, unc = {}, {}
            for n in FACTORS:
                w = flat[path + (n,)].get_value().astype(jnp.float32)
                sens = jnp.abs(w * grad[path + (n,)].get_value().astype(jnp.float32))
                avg = self.beta1 * st["ipt"][n] + (1 - self.beta1) * sens
                dev = self.beta2 * st["unc"][n] + (1 - self.beta2) * jnp.abs(sens - avg)
                ipt[n] = jnp.where(learning, avg, st["ipt"][n])
                unc[n] = jnp.where(learning, dev, st["unc"][n])
            new.append(dict(ipt=ipt, unc=unc, keep=st["keep"]))
        scores = [self.scores(st) for st in new]
        budget = jnp.where(final, self.target_bgt,
                           jnp.asarray(self.budgets)[jnp.clip(step, 0, self.final - 1)])
        allocate = final | (learning & (step > self.tinit) & (step % self.delta_t == 0))
        # PEFT masks every triplet scoring <= the k-th smallest score (torch.kthvalue)
        k = self.init_bgt - budget
        ranked = jnp.sort(jnp.concatenate([s.ravel() for s in scores]))
        threshold = jnp.where(k > 0, ranked[jnp.clip(k - 1, 0, ranked.size - 1)], -jnp.inf)
        masking = allocate | (step > self.final)
        for path, st, score in zip(self.paths, new, scores):
            st["keep"] = jnp.where(allocate, score > threshold, st["keep"])
            var = flat[path + ("lora_E",)]
            e = var.get_value()
            flat[path + ("lora_E",)] = var.replace(jnp.where(masking & ~st["keep"], jnp.zeros_like(e), e))
            for n in FACTORS:  # the final allocation resets the scores (PEFT's reset_ipt)
                st["ipt"][n] = jnp.where(final, 0.0, st["ipt"][n])
                st["unc"][n] = jnp.where(final, 0.0, st["unc"][n])
        return nnx.from_flat_state(list(flat.items())), new


def _check(a: ml_collections.ConfigDict) -> None:
    """PEFT's ``AdaLoraConfig`` checks, plus the ranks'."""
    where = "config.method.adalora"
    if a.total_step <= 0:
        raise MethodConfigError(f"{where}.total_step={a.total_step}: set it to the run's planned training "
                         "steps (PEFT's total_step, e.g. config.train.steps)")
    if not 0 <= a.target_r <= a.init_r or a.init_r < 1:
        raise MethodConfigError(f"{where}: need 0 <= target_r ({a.target_r}) <= init_r "
                                f"({a.init_r}) and init_r >= 1")
    if a.tfinal < 0 or not 0 <= a.tinit < a.total_step - a.tfinal:
        raise MethodConfigError(f"{where}: tinit={a.tinit}, tfinal={a.tfinal}, total_step={a.total_step} "
                         "leave no budgeting phase (need 0 <= tinit < total_step - tfinal)")
    if a.delta_t < 1:
        raise MethodConfigError(f"{where}.delta_t={a.delta_t} must be >= 1")
    if not (0 < a.beta1 < 1 and 0 < a.beta2 < 1):
        raise MethodConfigError(f"{where}: beta1={a.beta1} and beta2={a.beta2} must be in (0, 1)")
    if a.orth_reg_weight < 0:
        raise MethodConfigError(f"{where}.orth_reg_weight={a.orth_reg_weight} must be >= 0")


def _apply(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    a = m.adalora
    _check(a)
    paths = surgery.wrap_linears(model, layers.Linear, lora.targets(model, a.targets),
                                 lambda p, lin: AdaLoRALinear(lin, rank=a.init_r, alpha=a.alpha,
                                                              key=next(ctx.keys)), "adalora")
    adapted = dict(surgery.find(model, AdaLoRALinear))
    matrices = sum(int(np.prod(adapted[p].lora_E.get_value().shape[:-1])) for p in paths)
    plan = adapter_plan(model, ctx)
    plan.step_hook = Allocator(paths, a.init_r * matrices, a.target_r * matrices, a).hook()
    return plan


def _peft_config(model: nnx.Module, m: ml_collections.ConfigDict, found: list,
                 regex: Callable[[list], str]) -> dict[str, Any]:
    a = m.adalora
    return dict(init_r=int(a.init_r), target_r=int(a.target_r), lora_alpha=float(a.alpha),
                tinit=int(a.tinit), tfinal=int(a.tfinal), deltaT=int(a.delta_t),
                beta1=float(a.beta1), beta2=float(a.beta2), orth_reg_weight=float(a.orth_reg_weight),
                total_step=int(a.total_step), rank_pattern=None,
                target_modules=regex([p for p, _ in found]), lora_dropout=0.0, bias="none",
                fan_in_fan_out=False, init_lora_weights=True)


def _from_peft(config: dict, select: Callable[[Any], str]) -> dict[str, Any]:
    return dict(kind="adalora", adalora=dict(
        init_r=int(config["init_r"]), target_r=int(config["target_r"]),
        alpha=float(config.get("lora_alpha", 8)), tinit=int(config.get("tinit", 0)),
        tfinal=int(config.get("tfinal", 0)), delta_t=int(config.get("deltaT", 1)),
        beta1=float(config.get("beta1", 0.85)), beta2=float(config.get("beta2", 0.85)),
        orth_reg_weight=float(config.get("orth_reg_weight", 0.5)),
        total_step=int(config["total_step"]), targets=select(config["target_modules"])))


registry.register(registry.Method(
    "adalora", _apply, mergeable=True, peft=registry.PeftFormat("ADALORA", _peft_config, _from_peft),
    defaults={"adalora": dict(init_r=12, target_r=8, alpha=8.0, targets="",  # PEFT's defaults;
                              tinit=0, tfinal=0, delta_t=1, beta1=0.85, beta2=0.85,  # targets "" =
                              orth_reg_weight=0.5, total_step=0)}))  # the family's LoRA default
