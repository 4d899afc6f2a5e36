"""Building blocks shared by every model family.

Parameters are ``nnx.Param`` with ``logical_axes`` metadata (see ``ftjax.sharding``). Kernels are
stored ``[in, out]`` (HF torch ``Linear.weight`` transposed). Compute happens in ``dtype``;
parameters are stored in ``param_dtype``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]


def param(rngs: nnx.Rngs | None, init: Initializer, shape: Sequence[int], dtype,
          axes: Sequence[str | None]) -> nnx.Param:
    """A parameter with logical axis names."""
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), logical_axes=tuple(axes))


def normal(stddev: float) -> Initializer:
    return nnx.initializers.normal(stddev)


zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x [..., in] @ kernel [in, out]`` as one 2-D matmul over the flattened leading axes.

    The weight gradient then contracts a single token axis, which XLA:CPU runs without
    transposing the activations (the ``...i,io`` einsum copied ``dy`` transposed in every layer).
    """
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with kernel ``[in, out]``."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 use_bias: bool = False, init_std: float = 0.02, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = param(rngs, normal(init_std), (in_features, out_features), param_dtype, axes)
        self.bias = param(rngs, zeros, (out_features,), param_dtype, (axes[1],)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table ``[vocab, embed]``; ``attend`` reuses it as a tied output layer."""

    def __init__(self, num_embeddings: int, features: int, *, init_std: float = 0.02,
                 axes: tuple[str, str] = ("vocab", "embed"), dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, normal(init_std), (num_embeddings, features), param_dtype, axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return matmul(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32; ``offset=1`` gives Gemma's ``(1 + w)`` scale."""

    def __init__(self, features: int, *, eps: float = 1e-6, offset: float = 0.0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps, self.offset, self.dtype = eps, offset, dtype
        init = zeros if offset else ones
        self.scale = param(rngs, init, (features,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * (self.offset + self.scale[...].astype(jnp.float32))).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, computed in float32."""

    def __init__(self, features: int, *, eps: float = 1e-5, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, ones, (features,), param_dtype, ("norm",))
        self.bias = param(rngs, zeros, (features,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings (the "rotate half" layout used by HF checkpoints)
# ---------------------------------------------------------------------------------------------

def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> jax.Array:
    """Inverse frequencies, with optional ``linear`` or ``llama3`` scaling (HF semantics)."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    raise NotImplementedError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, N, H]`` by ``positions [B, T]``."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def attention_mask(q_segments: jax.Array, kv_segments: jax.Array, q_positions: jax.Array,
                   kv_positions: jax.Array, *, causal: bool, sliding_window: int | None = None
                   ) -> jax.Array:
    """Boolean ``[B, 1, Tq, Tk]`` mask: same non-zero segment, causal and windowed by position.

    Segment id 0 marks padding; packed examples get distinct ids so attention never crosses them.
    """
    mask = (q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_segments[:, None, :] != 0)
    if causal:
        mask &= kv_positions[:, None, :] <= q_positions[:, :, None]
    if sliding_window is not None:
        mask &= q_positions[:, :, None] - kv_positions[:, None, :] < sliding_window
    return mask[:, None]


class PrefixHook:
    """The prefix-tuning hook of an attention module (see ``ftjax.peft.prompt``): prefix tuning
    sets ``self.prefix`` to a module returning this layer's extra ``(keys, values)``."""

    prefix = None

    def prefix_kv(self) -> tuple[jax.Array, jax.Array] | None:
        return None if self.prefix is None else self.prefix()


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                          scale: float, softcap: float | None = None,
                          prefix: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Grouped-query attention. q ``[B,T,N,H]``, k/v ``[B,S,K,H]`` with N % K == 0 -> ``[B,T,N,H]``.

    ``prefix``: extra keys and values ``[P, K, H]`` that every query attends to (prefix tuning).
    """
    b, t, n, h = q.shape
    if prefix is not None:
        pk, pv = (jnp.broadcast_to(p.astype(k.dtype), (b,) + p.shape) for p in prefix)
        k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
        mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (pk.shape[1],), bool), mask], axis=-1)
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k).astype(jnp.float32) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def default_positions_and_segments(input_ids: jax.Array, attention_mask: jax.Array | None,
                                   positions: jax.Array | None, segment_ids: jax.Array | None
                                   ) -> tuple[jax.Array, jax.Array]:
    """Fill in positions (0..T-1, as HF does without position_ids) and segment ids (the mask)."""
    b, t = input_ids.shape
    if segment_ids is None:
        segment_ids = (jnp.ones((b, t), jnp.int32) if attention_mask is None
                       else attention_mask.astype(jnp.int32))
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return positions, segment_ids


# ---------------------------------------------------------------------------------------------
# Activations and dropout
# ---------------------------------------------------------------------------------------------

# HF ``hidden_act`` / ``hidden_activation`` names -> functions ("gelu" is the exact erf form).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"activation {name!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class DropoutKeep(nnx.Variable):
    """A dropout's keep probability held as frozen state rather than in the graph, so arms that
    differ only in the rate compile to one program (fused arms); never trained."""


class Dropout(nnx.Module):
    """Dropout driven by a key the train step installs (``set_dropout_key``): the identity
    until then, so evaluation, export and serving never drop anything.

    Keeping the key out of an nnx rng stream keeps the step pure: nothing mutates inside grad.
    A dropout inside stacked layers (a LoRA branch's) says its ``stack`` shape: it then holds one
    key per layer, which the layer scan hands out like the layers' parameters. With ``traced``
    the rate is a ``DropoutKeep`` value (one per stacked layer) instead of a constant.
    """

    def __init__(self, rate: float, stack: tuple[int, ...] = (), traced: bool = False):
        self.stack = tuple(stack)
        self.rate = None if traced else rate
        self.keep = DropoutKeep(jnp.full(self.stack, 1.0 - rate, jnp.float32)) if traced else nnx.data(None)
        self.key = nnx.data(None)

    def __call__(self, x: jax.Array, salt: int = 0) -> jax.Array:
        key = None if self.key is None else jax.random.fold_in(self.key, salt)
        if self.keep is None:
            return dropout(x, self.rate, key)
        return x if key is None else _drop(x, self.keep[...], key)

    def keys(self, shape: tuple[int, ...]) -> jax.Array | None:
        """Fresh keys (e.g. one per scanned layer), or None when dropout is off."""
        return None if self.key is None else jax.random.split(jax.random.fold_in(self.key, 2**31 - 1), shape)


def set_dropout_key(model: nnx.Module, key: jax.Array) -> None:
    """Install a distinct key in every ``Dropout`` of ``model`` (training mode), one per layer
    in a stacked one."""
    found = [m for _, m in nnx.iter_graph(model) if isinstance(m, Dropout)]
    for i, module in enumerate(found):
        own = jax.random.fold_in(key, i)
        module.key = nnx.data(jax.random.split(own, module.stack) if module.stack else own)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout with an explicit key; the identity when ``key`` is None or ``rate`` is 0.

    Scanned layers take their keys as per-layer inputs, so they cannot own an rng stream.
    """
    if key is None or rate == 0.0:
        return x
    return _drop(x, 1.0 - rate, key)


def _drop(x: jax.Array, keep_prob: float | jax.Array, key: jax.Array) -> jax.Array:
    """Keep each entry with probability ``keep_prob`` (a float32 value either way), scaled up."""
    keep = jax.random.bernoulli(key, keep_prob, x.shape)
    return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), 0).astype(x.dtype)
