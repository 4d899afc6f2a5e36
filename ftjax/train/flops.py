"""Training FLOPs per token and peak device FLOP/s, for the MFU estimate.

FLOPs per trained token = 6 * N (forward + backward matmuls over all N parameters except the
embedding lookups: the family's ``embeddings`` modules, the token table counted back in when the
head projects onto it) + 12 * L * T * H_q (attention scores and values, halved for a causal family
as MaxText counts it), with L layers, T the sequence length and H_q = num_heads * head_dim.
"""

from __future__ import annotations

import jax
from flax import nnx

from ftjax.models import registry

# bf16 dense peak per device (FLOP/s). CPU has no meaningful peak: MFU is then not reported.
_PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def peak_flops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, flops in _PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops
    return None


def train_flops_per_token(model: nnx.Module, seq_len: int) -> float:
    """6N + attention FLOPs per token (see the module docstring)."""
    params = nnx.state(model, nnx.Param)
    total = sum(x.size for x in jax.tree.leaves(params))
    cfg = getattr(getattr(model, "model", None), "cfg", None)
    if cfg is None:
        return 6.0 * total
    family = registry.family_for_config(cfg)
    token_table = ("model", *family.token_embedding.split("/"), "embedding")
    tied = bool(getattr(model, "ties_input_embedding", False))
    lookups = sum(var.get_value().size for path, var in nnx.to_flat_state(params)
                  if len(path) > 1 and path[0] == "model" and path[1] in family.embeddings
                  and not (tied and tuple(path) == token_table))
    head_dim = getattr(cfg, "resolved_head_dim", None) or cfg.hidden_size // cfg.num_heads
    attention = 12.0 * cfg.num_layers * seq_len * cfg.num_heads * head_dim
    return 6.0 * (total - lookups) + (attention / 2 if family.causal else attention)
