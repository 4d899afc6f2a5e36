"""The fine-tuning methods: one registered :class:`Method` object each, found by importing the modules
of the ``ftjax.peft`` package.

How to add a method (one new module ``ftjax/peft/<name>.py`` plus its test; nothing else changes):

1. Write ``apply(model, m, ctx) -> MethodPlan``: transform ``model`` in place for ``m``
   (``config.method``) and say what trains. ``ctx`` (:class:`Context`) holds the key stream
   (``next(ctx.keys)``), ``ctx.train_head`` and the tokenizer. Create every new parameter as a
   ``surgery.AdapterParam`` (``surgery.new_param`` does by default) and return
   ``plan.adapter_plan(model, ctx)``: what trains is then the ``AdapterParam`` type (plus the head
   when ``ctx.train_head``), never a list of names. A method that trains base weights returns
   ``plan.MethodPlan(model, filter, ...)`` itself.
2. An adapter on linear layers subclasses ``linear.WrappedLinear`` and is put in place with
   ``surgery.wrap_linears(model, layers.Linear, targets, make, name)``. When the adapter folds
   into the kernel the subclass implements ``merged_weights`` / ``unmerged_weights`` (``merge``
   / ``merge_and_unload`` then work); when it cannot it sets the class attribute
   ``mergeable = False`` (``merge_and_unload`` then refuses it). For PEFT export it
   implements ``peft_tensors() -> {suffix: array}`` (PEFT's tensor suffixes, ftjax's stacked
   leading axes kept) and ``load_peft_tensors(read)``, with ``read(suffix, transform)`` giving
   the stacked array back.
3. Register at module level::

       registry.register(registry.Method(
           "mymethod", apply, defaults={"mymethod": dict(rank=4)},  # -> config.method.mymethod
           mergeable=True, peft=registry.PeftFormat("MYPEFT", config_fn, method_fn)))

   ``mergeable=True`` lets export fold it into a plain HF model. ``defaults`` adds sections to ``config.method`` (a section several methods share is declared
   by one of them). ``plain=True`` marks a method that adds no parameters (exported as a plain
   model). ``peft`` (optional) gives PEFT's ``peft_type``, ``config_fn(model, m, found, regex)`` (the
   ``adapter_config.json`` entries beyond the common ones; ``found`` is ``[(path, module)]`` of
   the modules with ``peft_tensors``, ``regex(paths)`` PEFT's exact ``target_modules`` regex for
   them) and ``method_fn(config, select)`` (the ``config.method`` fields for a PEFT config as a
   nested dict; ``select(rule)`` turns a PEFT ``target_modules``-style rule into an ftjax path
   regex, ``"^$"`` when it selects nothing).

Layers to adapt are regexes over module paths (``model/layers/self_attn/q_proj``); a config
default of ``""`` means the model family's default (``Family.lora_targets`` ..., resolved with
``lora.targets(model, pattern)``), so no method hard-codes a family's module names.

Discovery imports every module of ``ftjax/peft`` the first time the registry is read, so a new
module registers itself by existing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

from ftjax import discovery


@dataclasses.dataclass(frozen=True)
class PeftFormat:
    """How a method is written as (and read back from) a Hugging Face PEFT adapter."""
    peft_type: str  # adapter_config.json's peft_type, e.g. "LORA"
    config_fn: Callable[..., dict]  # (model, m, found, regex) -> adapter_config.json entries
    method_fn: Callable[[dict, Callable[[Any], str]], dict]  # (config, select) -> config.method fields
    head_prefix: str = "base_model.model."  # where PEFT keeps a trained head (modules_to_save)


@dataclasses.dataclass(frozen=True)
class Method:
    """One fine-tuning method: its ``config.method.kind`` name, how it transforms a model, and how
    it can be exported."""
    name: str
    apply: Callable[..., Any]  # (model, m, ctx) -> MethodPlan
    defaults: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    plain: bool = False  # adds no parameters: export is the plain model
    mergeable: bool = False  # merge_and_unload folds it into the base weights
    peft: PeftFormat | None = None  # None: PEFT has no format for it


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` (at import of its module); a second method of the same name is an error."""
    old = _METHODS.get(method.name)
    if old is not None and old != method:
        raise ValueError(f"two fine-tuning methods are named {method.name!r}")
    _METHODS[method.name] = method
    return method


def _discover() -> None:
    discovery.import_all("ftjax.peft")


def methods() -> Iterator[Method]:
    _discover()
    return iter(sorted(_METHODS.values(), key=lambda m: m.name))


def names() -> tuple[str, ...]:
    return tuple(m.name for m in methods())


def get(name: str) -> Method:
    """The method ``config.method.kind`` names; the error lists them all."""
    _discover()
    if name not in _METHODS:
        raise ValueError(f"config.method.kind={name!r}; choose from {names()}")
    return _METHODS[name]


def defaults() -> dict[str, dict[str, Any]]:
    """Every method's ``config.method`` sections."""
    out: dict[str, dict[str, Any]] = {}
    for method in methods():
        for section, values in method.defaults.items():
            if section in out and out[section] != dict(values):
                raise ValueError(f"methods disagree on the defaults of config.method.{section}")
            out[section] = dict(values)
    return out
