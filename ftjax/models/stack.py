"""Layers stored stacked (leading ``layers`` axis) and run with ``lax.scan`` or unrolled.

The parameter layout is the same either way, so ``scan`` and ``remat`` are pure forward-pass
switches: checkpoints, optimizers and exports never see the difference.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_everything": jax.checkpoint_policies.everything_saveable,
}


def stack_layers(create: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs
                 ) -> nnx.Module:
    """Build ``num_layers`` copies of a block with independent init, stacked on axis 0."""
    keys = jax.random.split(rngs.params(), num_layers)
    states = jax.vmap(lambda k: nnx.split(create(nnx.Rngs(params=k)))[1])(keys)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: create(nnx.Rngs(params=0))))
    stacked = nnx.merge(graphdef, states)
    for _, var in nnx.iter_graph(stacked):
        if isinstance(var, nnx.Variable) and var.get_metadata().get("logical_axes") is not None:
            var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata()["logical_axes"]))
    return stacked


def run_layers(layers: nnx.Module, hidden: jax.Array, call: Callable[..., Any], *,
               scan: bool = True, remat: str = "none", per_layer: Any = None,
               collect: bool = False) -> Any:
    """Apply the stacked ``layers`` to ``hidden``.

    ``call(block, hidden, layer_input)`` runs one block; ``per_layer`` is an optional pytree with
    a leading layer axis (e.g. each layer's attention window) handed to the matching block. With
    ``collect``, ``call`` returns ``(hidden, layer_output)`` and the result is ``(hidden, outputs)``
    with the outputs stacked on a leading layer axis (e.g. each layer's updated KV cache).
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose from {sorted(REMAT_POLICIES)}")
    graphdef, state = nnx.split(layers)

    def body(h, xs):
        layer_state, layer_input = xs
        out = call(nnx.merge(graphdef, layer_state), h, layer_input)
        return out if collect else (out, None)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        hidden, outputs = jax.lax.scan(body, hidden, (state, per_layer))
    else:
        num_layers = jax.tree.leaves(state)[0].shape[0]
        outs = []
        for i in range(num_layers):
            hidden, out = body(hidden, jax.tree.map(lambda x: x[i], (state, per_layer)))
            outs.append(out)
        outputs = jax.tree.map(lambda *xs: jnp.stack(xs), *outs) if collect else None
    return (hidden, outputs) if collect else hidden
