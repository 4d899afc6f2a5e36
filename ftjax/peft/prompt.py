"""Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021) as virtual tokens.

Both turn the model's class into a subclass (same parameters and paths, plus the new ones) whose
call adds ``n`` virtual tokens in front of every row, the way HF ``peft`` does:

* prompt tuning prepends ``n`` learned input embeddings (``prompt_embeddings [n, D]``); virtual
  tokens take positions ``0..n-1`` and real tokens shift by ``n``; per-token outputs (LM logits)
  drop the virtual positions again.
* prefix tuning gives every layer ``n`` learned keys and values that all queries attend to
  (``prefix_embedding [n, L * 2 * K * H]`` in PEFT's layout, optionally produced by a
  reparametrisation MLP from ``[n, D]``); real tokens take positions ``n..``, as after a cache of
  length ``n`` in transformers. Attention modules take it through ``layers.PrefixHook``.

Rows are assumed to hold one example each (unpacked data): virtual tokens join the row's segment.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ftjax.models import layers, registry as families
from ftjax.peft import freezing, registry, surgery
from ftjax.peft.plan import Context, MethodPlan, adapter_plan


class PrefixKV(nnx.Module):
    """The attention hook: one layer's ``(keys, values)`` ``[n, K, H]`` (stacked ``[L, 2, n, K, H]``).

    ``kv`` is a plain array, replaced (never mutated) on every call by the model's forward, so a
    traced prefix flows into the layer scan like any other per-layer state.
    """

    def __init__(self, value: jax.Array):
        self.kv = nnx.data(value)

    def __call__(self) -> tuple[jax.Array, jax.Array]:
        return self.kv[0], self.kv[1]


def input_embedding(model: nnx.Module) -> layers.Embed:
    """The token embedding table of a headed model (where its family says it is)."""
    module = model.model
    for name in families.family_of(model).token_embedding.split("/"):
        module = getattr(module, name)
    return module


def attention_modules(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """Attention modules with a ``prefix`` hook."""
    return [(tuple(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, layers.PrefixHook)]


class VirtualTokens:
    """Methods of the model subclass with virtual tokens (see the module docstring).

    The subclass derives from the model's class alone (CPython only lets ``__class__`` change
    between classes of one layout), so these are copied into it and reach the original call
    with ``super(type(self), self)``.
    """

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                 inputs_embeds=None, **kwargs):
        n = self.num_virtual_tokens
        b, t = input_ids.shape
        positions, segment_ids = layers.default_positions_and_segments(
            input_ids, attention_mask, positions, segment_ids)
        if self.prompt_embeddings is None:
            self._write_prefix()
            return super(type(self), self).__call__(input_ids, attention_mask, positions + n, segment_ids,
                                    inputs_embeds, **kwargs)
        embeds = input_embedding(self)(input_ids) if inputs_embeds is None else inputs_embeds
        prompt = jnp.broadcast_to(self.prompt_embeddings[...].astype(embeds.dtype),
                                  (b,) + self.prompt_embeddings.shape)
        pad = lambda x, v: jnp.concatenate([jnp.full((b, n), v, x.dtype), x], axis=1)
        row_segment = jnp.max(segment_ids, axis=1, keepdims=True)
        segment_ids = jnp.concatenate([jnp.broadcast_to(row_segment, (b, n)), segment_ids], axis=1)
        positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype), (b, n)),
                                     positions + n], axis=1)
        if attention_mask is not None:
            attention_mask = pad(attention_mask, 1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = pad(kwargs["token_type_ids"], 0)
        out = super(type(self), self).__call__(pad(input_ids, 0), attention_mask, positions, segment_ids,
                               jnp.concatenate([prompt, embeds], axis=1), **kwargs)
        return out[:, n:] if out.ndim == 3 and out.shape[1] == n + t else out

    def prefix_values(self) -> jax.Array:
        """The prefix in PEFT's flat layout ``[n, L * 2 * K * H]`` (after the MLP, if any)."""
        x = self.prefix_embedding[...]
        if self.prefix_mlp is not None:
            x = self.prefix_mlp[1](jnp.tanh(self.prefix_mlp[0](x)))
        return x

    def peft_tensors(self) -> dict[str, np.ndarray]:
        """PEFT's one tensor, ``prompt_embeddings`` (for prefix tuning: the flat keys/values)."""
        x = self.prefix_values() if self.prompt_embeddings is None else self.prompt_embeddings
        return {"prompt_embeddings": surgery.host(x)}

    def load_peft_tensors(self, read: Callable[[str, Callable], np.ndarray]) -> None:
        target = self.prefix_embedding if self.prompt_embeddings is None else self.prompt_embeddings
        surgery.assign(target, read("prompt_embeddings", np.asarray), "prompt_embeddings")

    def _write_prefix(self) -> None:
        (_, attn), = attention_modules(self)
        num_layers, _, n, k, h = attn.prefix.kv.shape
        flat = self.prefix_values().reshape(n, num_layers, 2, k, h)
        attn.prefix.kv = nnx.data(jnp.transpose(flat, (1, 2, 0, 3, 4)).astype(attn.prefix.kv.dtype))


_SUBCLASSES: dict[type, type] = {}


def has_virtual_tokens(model: nnx.Module) -> bool:
    return type(model) in _SUBCLASSES.values()


def _with_virtual_tokens(model: nnx.Module, n: int) -> None:
    cls = type(model)
    if not has_virtual_tokens(model):
        if cls not in _SUBCLASSES:
            methods = {k: v for k, v in vars(VirtualTokens).items() if callable(v)}
            _SUBCLASSES[cls] = type(f"VirtualTokens{cls.__name__}", (cls,), methods)
        model.__class__ = _SUBCLASSES[cls]
    model.num_virtual_tokens = n
    model.prompt_embeddings = nnx.data(None)
    model.prefix_embedding = nnx.data(None)
    model.prefix_mlp = nnx.data(None)


def add_prompt(model: nnx.Module, n: int, *, key: jax.Array, init_ids: np.ndarray | None = None
               ) -> nnx.Module:
    """Prompt tuning: ``n`` soft prompt embeddings, from ``init_ids``' embeddings (cycled) or from
    randomly drawn vocabulary rows."""
    if n < 1:
        raise ValueError(f"config.method.prompt.num_virtual_tokens={n} must be >= 1")
    table = input_embedding(model).embedding
    vocab = table.get_value().shape[0]
    ids = (np.resize(np.asarray(init_ids), n) if init_ids is not None and len(init_ids)
           else np.asarray(jax.random.randint(key, (n,), 0, vocab)))
    _with_virtual_tokens(model, n)
    axes = (None, surgery.axes_of(table)[-1])
    value = surgery.compute_like(table, lambda t: t[jnp.asarray(ids)], table.get_value(), axes=axes)
    model.prompt_embeddings = surgery.AdapterParam(value, logical_axes=axes)
    return model


def add_prefix(model: nnx.Module, n: int, *, key: jax.Array, projection: int = 0,
               init_std: float = 0.02) -> nnx.Module:
    """Prefix tuning: ``n`` keys/values per layer; ``projection > 0`` adds PEFT's
    reparametrisation MLP ``Linear(D, projection) -> tanh -> Linear(projection, L * 2 * K * H)``."""
    if n < 1:
        raise ValueError(f"config.method.prefix.num_virtual_tokens={n} must be >= 1")
    attns = attention_modules(model)
    if len(attns) != 1:
        raise ValueError(f"prefix tuning needs one stack of attention modules with a prefix hook; "
                         f"{type(model.model).__name__} has {len(attns)}")
    (_, attn), = attns
    table = input_embedding(model).embedding
    _with_virtual_tokens(model, n)
    k1, k2 = jax.random.split(key)
    num_layers = jax.tree.leaves(nnx.state(attn))[0].shape[0]
    heads = getattr(attn, "num_kv_heads", attn.num_heads)
    zeros = jnp.zeros((num_layers, 2, n, heads, attn.head_dim), jnp.float32)
    target = surgery.sharding_like(table, zeros.shape, (None,) * zeros.ndim)
    attn.prefix = PrefixKV(zeros if target is None else jax.device_put(zeros, target))
    width = num_layers * 2 * heads * attn.head_dim
    d = table.get_value().shape[-1]
    if projection:
        model.prefix_embedding = surgery.new_param(table, surgery.normal(init_std), (n, d),
                                                   (None, None), k1)
        rngs = nnx.Rngs(params=k2)
        model.prefix_mlp = nnx.List([
            layers.Linear(d, projection, axes=(None, None), use_bias=True, rngs=rngs),
            layers.Linear(projection, width, axes=(None, None), use_bias=True, rngs=rngs)])
        surgery.place_like(table, surgery.as_adapter(model.prefix_mlp))
    else:
        model.prefix_embedding = surgery.new_param(table, surgery.normal(init_std), (n, width),
                                                   (None, None), k1)
    return model


def attention(model: nnx.Module) -> nnx.Module:
    """The model's one (stacked) attention module with a prefix hook."""
    found = attention_modules(model)
    if len(found) != 1:
        raise ValueError(f"expected one stack of attention modules, found {len(found)}")
    return found[0][1]


def _init_ids(tokenizer: Any, text: str) -> np.ndarray | None:
    if not text:
        return None
    if tokenizer is None:
        raise ValueError("config.method.prompt.init_text needs a tokenizer")
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"])


def _apply_prompt(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    add_prompt(model, m.prompt.num_virtual_tokens, key=next(ctx.keys),
               init_ids=_init_ids(ctx.tokenizer, m.prompt.init_text))
    return adapter_plan(model, ctx)


def _apply_prefix(model: nnx.Module, m: ml_collections.ConfigDict, ctx: Context) -> MethodPlan:
    add_prefix(model, m.prefix.num_virtual_tokens, key=next(ctx.keys),
               projection=m.prefix.projection)
    return adapter_plan(model, ctx)


def _common(model: nnx.Module) -> dict[str, Any]:
    return dict(num_virtual_tokens=model.num_virtual_tokens, num_transformer_submodules=1,
                num_layers=freezing.num_layers(model))


def _prompt_config(model: nnx.Module, m: ml_collections.ConfigDict, found: list,
                   regex: Callable) -> dict[str, Any]:
    return dict(token_dim=model.prompt_embeddings.get_value().shape[1],
                num_attention_heads=attention(model).num_heads, prompt_tuning_init="RANDOM",
                **_common(model))


def _prefix_config(model: nnx.Module, m: ml_collections.ConfigDict, found: list,
                   regex: Callable) -> dict[str, Any]:
    attn = attention(model)
    heads = getattr(attn, "num_kv_heads", attn.num_heads)
    return dict(token_dim=heads * attn.head_dim, num_attention_heads=heads,
                encoder_hidden_size=model.model.cfg.hidden_size, prefix_projection=False,
                **_common(model))


def _from_peft(kind: str) -> Callable[[dict, Callable], dict]:
    return lambda config, select: {"kind": kind,
                                   kind: dict(num_virtual_tokens=int(config["num_virtual_tokens"]))}


# Prompt learning has no tuner layer: a trained head is saved under "base_model." in PEFT.
registry.register(registry.Method(
    "prompt", _apply_prompt,
    peft=registry.PeftFormat("PROMPT_TUNING", _prompt_config, _from_peft("prompt"), "base_model."),
    defaults={"prompt": dict(num_virtual_tokens=20, init_text="")}))  # "" = random vocabulary rows
registry.register(registry.Method(
    "prefix", _apply_prefix,
    peft=registry.PeftFormat("PREFIX_TUNING", _prefix_config, _from_peft("prefix"), "base_model."),
    defaults={"prefix": dict(num_virtual_tokens=20, projection=0)}))  # projection > 0: MLP hidden size
