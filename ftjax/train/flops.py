"""Training FLOPs per token and peak device FLOP/s, for the MFU estimate.

FLOPs per trained token = 6 * N (forward + backward matmuls over all N parameters except the
input embedding lookup) + 6 * L * T * H_q (attention scores and values: 12 * L * T * H_q for full
attention, halved for causal masking as MaxText counts it), with L layers, T the sequence length
and H_q = num_heads * head_dim.
"""

from __future__ import annotations

import jax
from flax import nnx

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
    """6N + causal attention FLOPs per token (see the module docstring)."""
    params = nnx.state(model, nnx.Param)
    total = sum(x.size for x in jax.tree.leaves(params))
    embed = 0
    for path, value in nnx.to_flat_state(params):
        if path[-1] == "embedding" and "embed_tokens" in path:
            embed += value.get_value().size
    cfg = getattr(getattr(model, "model", model), "cfg", None)
    attention = 0.0
    if cfg is not None and hasattr(cfg, "num_layers"):
        head_dim = getattr(cfg, "resolved_head_dim", None) or cfg.hidden_size // cfg.num_heads
        attention = 6.0 * cfg.num_layers * seq_len * cfg.num_heads * head_dim
    tied = getattr(model, "lm_head", "absent") is None
    matmul_params = total - embed + (embed if tied else 0)
    return 6.0 * matmul_params + attention
