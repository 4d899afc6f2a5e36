"""OFT (Qiu et al. 2023; PEFT's current form, Qiu et al. 2025): a learned block-diagonal rotation
of each adapted layer's input.

``y = (x R) W + b`` with ``R = diag(R_1 .. R_n)``, ``n`` blocks of ``block_size`` (``n = in /
block_size``; PEFT's ``r`` may give ``n`` instead). Each block is the Cayley transform of a skew-
symmetric ``Q_i`` whose upper triangle is the trained vector (PEFT's ``oft_R.weight [n,
b(b-1)/2]``, zero at init, so a fresh adapter changes nothing): ``R_i = (I - Q)(I + Q)^-1``, by
default approximated as PEFT does by its Neumann series ``I + 2Q + 2Q^2 + ... + Q^(t-1)`` with
``t = num_cayley_neumann_terms``. Merging folds ``R`` into the kernel (``W <- R W``); unmerging
solves it back. PEFT's constrained (``coft``) and block-shared variants are not implemented.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ftjax.models import layers
from ftjax.peft import registry, surgery
from ftjax.peft.linear import WrappedLinear
from ftjax.peft.lora import TARGETS
from ftjax.peft.plan import Context, MethodPlan, adapter_plan

PEFT_NAME = "oft_R.weight"


def skew(vec: jax.Array, block_size: int) -> jax.Array:
    """``[..., b(b-1)/2]`` upper triangles (row-major, as ``torch.triu_indices``) -> ``Q - Q^T``."""
    rows, cols = np.triu_indices(block_size, 1)
    q = jnp.zeros(vec.shape[:-1] + (block_size, block_size), vec.dtype).at[..., rows, cols].set(vec)
    return q - jnp.swapaxes(q, -1, -2)


def cayley(q: jax.Array, neumann: bool, terms: int) -> jax.Array:
    """PEFT's ``_cayley_batch``: ``(I - Q)(I + Q)^-1`` exactly or by its truncated Neumann series."""
    eye = jnp.eye(q.shape[-1], dtype=q.dtype)
    if not neumann:  # X (I + Q) = I - Q
        return jnp.swapaxes(jnp.linalg.solve(jnp.swapaxes(eye + q, -1, -2),
                                             jnp.swapaxes(eye - q, -1, -2)), -1, -2)
    r = jnp.broadcast_to(eye, q.shape)
    if terms > 1:
        r = r + 2 * q
    if terms > 2:
        power = q @ q
        r = r + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            r = r + 2 * power
        r = r + power @ q
    return r


class OFTLinear(WrappedLinear):
    """A Linear whose input is rotated block-wise; stacked like the kernel it adapts."""

    mergeable = True

    def __init__(self, base: layers.Linear, *, block_size: int, use_cayley_neumann: bool,
                 num_cayley_neumann_terms: int, key: jax.Array):
        super().__init__(base)
        if block_size < 2 or self.in_features % block_size:
            raise ValueError(f"config.method.oft: block size {block_size} must be >= 2 and divide "
                             f"the input size {self.in_features} of every adapted layer")
        lead_shape, lead_axes = surgery.lead(base.kernel, 2)
        self.block_size, self.num_blocks = block_size, self.in_features // block_size
        self.neumann, self.terms = bool(use_cayley_neumann), int(num_cayley_neumann_terms)
        n_elements = block_size * (block_size - 1) // 2  # the upper triangle of a block
        self.oft_r = surgery.new_param(base.kernel, surgery.constant(0.0),
                                       lead_shape + (self.num_blocks, n_elements),
                                       lead_axes + (None, None), key)

    def rotation(self) -> jax.Array:
        """The blocks ``R_i`` ``[..., n, b, b]`` in float32."""
        q = skew(self.oft_r[...].astype(jnp.float32), self.block_size)
        return cayley(q, self.neumann, self.terms)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.merged:
            return super().__call__(x)
        x = x.astype(self.dtype)
        blocks = x.reshape(x.shape[:-1] + (self.num_blocks, self.block_size))
        rotated = jnp.einsum("...nk,nkc->...nc", blocks, self.rotation().astype(self.dtype))
        return super().__call__(rotated.reshape(x.shape))

    def _blocks(self, w: jax.Array) -> jax.Array:
        return w.reshape(w.shape[:-2] + (self.num_blocks, self.block_size, w.shape[-1]))

    def merged_weights(self) -> tuple[jax.Array, jax.Array | None]:
        w, bias = super().merged_weights()
        w32 = self._blocks(w.astype(jnp.float32))
        merged = jnp.einsum("...nkc,...nco->...nko", self.rotation(), w32)
        return merged.reshape(w.shape), bias

    def unmerged_weights(self) -> tuple[jax.Array, jax.Array | None]:
        w = self.kernel[...].astype(jnp.float32)
        return (jnp.linalg.solve(self.rotation(), self._blocks(w)).reshape(w.shape),
                None if self.bias is None else self.bias[...])

    def peft_tensors(self) -> dict[str, np.ndarray]:
        return {PEFT_NAME: surgery.host(self.oft_r)}

    def load_peft_tensors(self, read: Callable[[str, Callable], np.ndarray]) -> None:
        surgery.assign(self.oft_r, read(PEFT_NAME, np.asarray), PEFT_NAME)


def block_size(o: ml_collections.ConfigDict, in_features: int) -> int:
    """The block size ``config.method.oft`` gives a layer: ``block_size``, or ``in / r`` when only
    ``r`` (PEFT's number of blocks) is set."""
    if bool(o.block_size) == bool(o.r):
        raise ValueError(f"config.method.oft: set exactly one of block_size ({o.block_size}) and r "
                         f"({o.r})")
    if o.block_size:
        return int(o.block_size)
    if in_features % o.r:
        raise ValueError(f"config.method.oft.r={o.r} does not divide the input size {in_features}")
    return in_features // int(o.r)


def _apply(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    o = m.oft
    surgery.wrap_linears(model, layers.Linear, o.targets, lambda p, lin: OFTLinear(
        lin, block_size=block_size(o, lin.in_features), use_cayley_neumann=o.use_cayley_neumann,
        num_cayley_neumann_terms=o.num_cayley_neumann_terms, key=next(ctx.keys)), "oft")
    return adapter_plan(model, ctx)


def _peft_config(model: nnx.Module, m: ml_collections.ConfigDict, found: list,
                 regex: Callable[[list], str]) -> dict[str, Any]:
    o = m.oft
    return dict(r=int(o.r), oft_block_size=int(o.block_size),
                target_modules=regex([p for p, _ in found]),
                use_cayley_neumann=bool(o.use_cayley_neumann),
                num_cayley_neumann_terms=int(o.num_cayley_neumann_terms), coft=False, eps=6e-5,
                block_share=False, module_dropout=0.0, bias="none", fan_in_fan_out=False,
                init_weights=True)


def _from_peft(config: dict, select: Callable[[Any], str]) -> dict[str, Any]:
    for key in ("coft", "block_share"):
        if config.get(key):
            raise ValueError(f"PEFT OFT adapter uses {key}=true, which ftjax does not implement")
    return dict(kind="oft", oft=dict(
        r=int(config.get("r", 0)), block_size=int(config.get("oft_block_size", 0)),
        targets=select(config["target_modules"]),
        use_cayley_neumann=bool(config.get("use_cayley_neumann", True)),
        num_cayley_neumann_terms=int(config.get("num_cayley_neumann_terms", 5))))


registry.register(registry.Method(
    "oft", _apply, mergeable=True, peft=registry.PeftFormat("OFT", _peft_config, _from_peft),
    defaults={"oft": dict(block_size=32, r=0, targets=TARGETS,  # PEFT's defaults
                          use_cayley_neumann=True, num_cayley_neumann_terms=5)}))
