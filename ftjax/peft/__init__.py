"""Fine-tuning methods as transformations of a model and of its trainable-parameter filter.

Each method is one registered object in its own module (see ``ftjax.peft.registry`` for how to
add one); ``apply_method(model, config.method)`` runs it and returns a :class:`MethodPlan`.
"""

from __future__ import annotations

from flax import nnx

from ftjax.models.registry import count_params
from ftjax.peft import prompt, quant, registry, surgery
from ftjax.peft.config import method_config
from ftjax.peft.linear import WrappedLinear
from ftjax.peft.peft_format import export_peft, import_peft, method_from_peft
from ftjax.peft.plan import MethodPlan, apply_method

METHODS = registry.names()


def wrapped_linears(model: nnx.Module) -> list[tuple[tuple, WrappedLinear]]:
    return surgery.find(model, WrappedLinear)


def merge(model: nnx.Module) -> nnx.Module:
    """Fold mergeable adapters (LoRA/DoRA/IA3) into their kernels in place (the forward skips them)."""
    for _, lin in wrapped_linears(model):
        lin.merge()
    return model


def unmerge(model: nnx.Module) -> nnx.Module:
    """Undo :func:`merge`."""
    for _, lin in wrapped_linears(model):
        lin.unmerge()
    return model


def total_weights(model: nnx.Module) -> int:
    """Parameters of the model as a float model would count them (quantised kernels included)."""
    quantized = sum(m.num_weights for _, m in nnx.iter_graph(model)
                    if isinstance(m, quant.QuantizedKernel))
    return count_params(model) + quantized


def merge_and_unload(model: nnx.Module) -> nnx.Module:
    """The plain model (every wrapper replaced by a ``layers.Linear`` holding merged, dequantised
    weights), ready for ``save_pretrained``; virtual tokens and unmergeable adapters refuse."""
    unmergeable = sorted({type(lin).__name__ for _, lin in wrapped_linears(model)
                          if not lin.mergeable})
    if prompt.has_virtual_tokens(model) or unmergeable:
        what = ", ".join(unmergeable) if unmergeable else "prompt/prefix tuning"
        raise ValueError(f"{what} cannot be merged into the base weights; export with "
                         "export_peft where PEFT has the method's format, or keep the adapter model")
    for path, lin in wrapped_linears(model):
        surgery.replace(model, path, lin.unwrap())
    return model


__all__ = ["METHODS", "MethodPlan", "apply_method", "total_weights", "export_peft", "import_peft", "merge",
           "merge_and_unload", "method_config", "method_from_peft", "unmerge"]
