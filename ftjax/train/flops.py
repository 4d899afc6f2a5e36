"""Training FLOPs: the model-FLOPs count behind the loop's MFU, and what one step executes.

``train_flops_per_token`` (the loop's MFU, method-independent): 6 * N (forward + backward matmuls
over all N parameters except the embedding lookups: the family's ``embeddings`` modules, the token
table counted back in when the head projects onto it) + 12 * L * T * H_q (attention scores and
values, halved for a causal family as MaxText counts it), with L layers, T the sequence length and
H_q = num_heads * head_dim.

``step_flops`` (the planner's, method-aware) counts the matmuls the jitted step executes. A weight
W [d_in, d_out] applied to n rows costs 2 n d_in d_out forward; backward, the weight gradient
x^T dy costs the same again only when W trains (it is in the differentiated state), and the input
gradient dy W^T only when something trainable lies below W (autodiff computes nothing else). So
per row, with the parameters in three places (embeddings below the layer stack, the stack, the
head/pooler above it):

    trained weight               6   (2 forward + 2 weight grad + 2 input grad)
    frozen weight, grads pass    4   (2 forward + 2 input grad)
    frozen weight, forward only  2   (nothing trainable below it: e.g. the backbone of head-only)
    (a trained weight with nothing trainable below it, a head-only head: 4)

"Below" is by place: a trainable stacked parameter spans every layer (the layers are one stacked
array), so all stack weights pass gradients when anything in the stack trains; this counts layer
0's weights under its lowest adapter (LoRA on q/v: layer 0's q/k/v kernels) at 4, not 2 (~2% on
the demo's LoRA). Rows are B * T' tokens for the stack and a token-level head (LM, tagging) and B
for a sequence classifier's pooler and head; T' = T + n for prompt tuning's n virtual tokens.
Attention adds per layer and sequence 4 T' T_k H_q forward (scores Q K^T and values P V, the full
T' x T_k square: the causal mask does not skip work in ``layers.dot_product_attention``) and 8 T'
T_k H_q backward (dP, dV, dS->dQ, dK) when the stack passes gradients; T_k = T' + n for prefix
tuning. LoHa/LoKr (``delta.DeltaLinear``) multiply by ``W + dW``, so a trained one costs its base
kernel 6, not 4, and their factors (and prompt/prefix parameters) run once per step, not per row:
not counted. Embedding lookups, biases, norm scales and IA3/VeRA vectors are elementwise (not
counted); VeRA's shared projections are buffers, not parameters (r (d_in + d_out) per row each,
not counted). QLoRA's quantised kernels count as frozen weights of their float size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from ftjax.models import registry
from ftjax.peft.delta import DeltaLinear
from ftjax.peft.quant import QuantizedKernel

# bf16 dense peak per device (FLOP/s; sources in ftjax/train/hardware.py). CPU has no meaningful peak: MFU is then not reported.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def peak_flops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
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


# Where a parameter sits: below the layer stack, in it, above it (head, pooler, final norm).
BELOW, STACK, ABOVE = 0, 1, 2
PER_STEP = ("prompt_embeddings", "prefix_embedding", "prefix_mlp")  # top-level virtual-token params
TOKEN_HEADS = ("causal_lm", "token_classification", "masked_lm")


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Matmul FLOPs of one training step (all devices together), by kind (module docstring)."""
    trained: float  # weights that train: forward + weight grad (+ input grad)
    frozen_backward: float  # frozen weights gradients pass through: forward + input grad
    frozen_forward: float  # frozen weights with nothing trainable below: forward only
    attention: float  # the T x T_k score and value products, forward (+ backward)

    @property
    def total(self) -> float:
        return self.trained + self.frozen_backward + self.frozen_forward + self.attention


def _where(path: tuple, var: nnx.Variable, family: registry.Family) -> int:
    """BELOW / STACK / ABOVE for any parameter (where a gradient to it would have to reach)."""
    if path[0] in PER_STEP:  # a prompt is an input; a prefix is every layer's keys and values
        return BELOW if path[0] == "prompt_embeddings" else STACK
    if len(path) > 1 and path[0] == "model" and path[1] in family.embeddings:
        return BELOW
    axes = var.get_metadata().get("logical_axes") or ()
    return STACK if axes and axes[0] == "layers" else ABOVE


def _matmul_place(path: tuple, var: nnx.Variable, family: registry.Family, tied: bool
                  ) -> int | None:
    """Where a weight multiplies every row, or None for a lookup or an elementwise parameter."""
    axes = var.get_metadata().get("logical_axes") or ()
    if len(var.get_value().shape) - (bool(axes) and axes[0] == "layers") < 2:
        return None  # bias, norm scale, IA3/VeRA vector
    if _where(path, var, family) == BELOW:  # a lookup; the tied token table is also the LM head
        token_table = ("model", *family.token_embedding.split("/"), "embedding")
        return ABOVE if tied and path == token_table else None
    return _where(path, var, family)


def lowest_trainable(model: nnx.Module, trainable: Any) -> int:
    """The lowest place (BELOW / STACK / ABOVE) holding a parameter ``trainable`` selects (ABOVE
    + 1 when none): from there up, the backward pass runs through the layers."""
    family = registry.family_for_config(model.model.cfg)
    return min((_where(tuple(p), v, family) for p, v in nnx.to_flat_state(nnx.state(model, trainable))),
               default=ABOVE + 1)


def step_flops(model: nnx.Module, trainable: Any, batch: int, seq_len: int) -> StepFlops:
    """FLOPs of one train step of ``model`` (concrete or from ``nnx.eval_shape``) training the
    parameters ``trainable`` (an nnx filter) on ``batch`` rows of ``seq_len`` tokens."""
    family = registry.family_for_config(model.model.cfg)
    tied = bool(getattr(model, "ties_input_embedding", False))
    per_step, dense, quantized = set(), {}, {}  # delta factors; W + dW kernels; float sizes
    for path, node in nnx.iter_graph(model):
        path = tuple(path)
        if isinstance(node, DeltaLinear) and type(node).__call__ is DeltaLinear.__call__:
            dense[path + ("kernel",)] = path
            per_step.update(path + (name,) for name in vars(node) if name not in ("kernel", "bias"))
        elif isinstance(node, QuantizedKernel):
            quantized[path + ("codes",)] = node.num_weights
            per_step.add(path + ("scales",))
    trains = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, trainable))}
    flat = [(tuple(p), v) for p, v in nnx.to_flat_state(nnx.state(model))]
    lowest = lowest_trainable(model, trainable)
    weights = []  # (place, size, trains) of every weight that multiplies each row
    for path, var in flat:
        if path[0] in PER_STEP or any(path[:len(q)] == q for q in per_step):
            continue
        if path in quantized:
            weights.append((STACK, quantized[path], False))
            continue
        place = _matmul_place(path, var, family, tied) if isinstance(var, nnx.Param) else None
        if place is None:
            continue
        delta_trains = path in dense and any(p[:len(dense[path])] == dense[path] for p in trains)
        weights.append((place, var.get_value().size, path in trains or delta_trains))
    n = int(getattr(model, "num_virtual_tokens", 0) or 0)
    tokens = seq_len + (n if getattr(model, "prompt_embeddings", None) is not None else 0)
    keys = tokens + (n if getattr(model, "prefix_embedding", None) is not None else 0)
    head_rows = batch * tokens if registry.head_of(model) in TOKEN_HEADS else batch
    out = dict(trained=0.0, frozen_backward=0.0, frozen_forward=0.0)
    for place, size, trained in weights:
        grads_in = lowest < place or lowest == place == STACK
        kind = "trained" if trained else "frozen_backward" if grads_in else "frozen_forward"
        out[kind] += (2 + 2 * trained + 2 * grads_in) * size * (head_rows if place == ABOVE
                                                                 else batch * tokens)
    cfg = model.model.cfg
    head_dim = getattr(cfg, "resolved_head_dim", None) or cfg.hidden_size // cfg.num_heads
    passes = 3 if lowest <= STACK else 1  # forward, + backward (twice the forward's products)
    attention = 4.0 * batch * cfg.num_layers * tokens * keys * cfg.num_heads * head_dim * passes
    return StepFlops(**out, attention=attention)
