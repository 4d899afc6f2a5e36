"""Write a decoder LM as a GGUF file the way llama.cpp's ``convert_hf_to_gguf.py`` would.

Input is what a Hugging Face export holds: the transformers ``config.json`` dict and the tensors
under transformers names (HF layout, float32). Tensor names map through the ``gguf`` package's
own ``TensorNameMap``; per architecture the converter's tensor edits are applied (q/k row
permutation for ``llama``, ``1 + w`` norms for Gemma, transposed ``Conv1D`` weights and a copied
``output`` for GPT-2) and its metadata keys written. A feature llama.cpp would silently drop or
compute differently (sliding windows it does not model, llama3 rope, a non-default attention
scale or layer pattern) is refused with ``NotImplementedError`` rather than written lossy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable

import gguf
import numpy as np

from ftjax.models.gguf_io import quants, vocab
from ftjax.models.gguf_io.reading import permute

Writer = gguf.GGUFWriter


def _rope(hf: dict, key: str | None = None) -> dict:
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0),
                                         **(hf.get("rope_scaling") or {})}
    return dict(rope[key] if key else rope)


def _check_rope(rope: dict, model_type: str) -> None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise NotImplementedError(f"rope scaling {kind!r} of a {model_type} model cannot be "
                                  f"exported to GGUF (default and linear can)")


def _add_rope(w: Writer, rope: dict) -> None:
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type", rope.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))


def _attention(w: Writer, hf: dict) -> None:
    """What ``TextModel.set_gguf_parameters`` writes for every RMSNorm decoder."""
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_block_count(hf["num_hidden_layers"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(hf["num_attention_heads"])
    w.add_head_count_kv(hf.get("num_key_value_heads", hf["num_attention_heads"]))
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    if hf.get("head_dim"):
        w.add_key_length(hf["head_dim"])
        w.add_value_length(hf["head_dim"])


def _llama(w: Writer, hf: dict) -> None:
    if hf.get("sliding_window") is not None:
        raise NotImplementedError("llama.cpp runs llama/mistral without a sliding window; "
                                  "refusing a GGUF that would attend differently")
    rope = _rope(hf)
    _check_rope(rope, hf["model_type"])
    _attention(w, hf)
    _add_rope(w, rope)
    w.add_vocab_size(hf["vocab_size"])
    w.add_rope_dimension_count(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


def _qwen(w: Writer, hf: dict) -> None:
    if hf.get("use_sliding_window"):
        raise NotImplementedError("llama.cpp runs Qwen without its sliding window; refusing a "
                                  "GGUF that would attend differently")
    rope = _rope(hf)
    _check_rope(rope, hf["model_type"])
    _attention(w, hf)
    _add_rope(w, rope)


def _gemma_scale_and_pattern(hf: dict, period: int) -> None:
    """llama.cpp's Gemma 2/3 scale queries by ``head_dim ** -0.5`` (except for 27B shapes) and
    fix the local/global layer pattern; anything else would run differently there."""
    if hf["query_pre_attn_scalar"] != hf["head_dim"]:
        raise NotImplementedError(f"query_pre_attn_scalar={hf['query_pre_attn_scalar']} differs "
                                  f"from head_dim={hf['head_dim']}; llama.cpp scales by head_dim")
    n = hf["num_hidden_layers"]
    pattern = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
    if list(hf["layer_types"]) != pattern:
        raise NotImplementedError(f"llama.cpp runs {hf['model_type']} with every {period}th layer "
                                  f"global; this model's layer_types differ")


def _gemma(w: Writer, hf: dict) -> None:
    _check_rope(_rope(hf), "gemma")
    if _rope(hf)["rope_theta"] != 10000.0 or _rope(hf).get("rope_type", "default") != "default":
        raise NotImplementedError("llama.cpp runs Gemma 1 with rope theta 10000 and no scaling")
    _attention(w, hf)


def _gemma2(w: Writer, hf: dict) -> None:
    _gemma_scale_and_pattern(hf, 2)
    rope = _rope(hf)
    if rope["rope_theta"] != 10000.0 or rope.get("rope_type", "default") != "default":
        raise NotImplementedError("llama.cpp runs Gemma 2 with rope theta 10000 and no scaling")
    _attention(w, hf)
    w.add_attn_logit_softcapping(hf["attn_logit_softcapping"])
    w.add_final_logit_softcapping(hf["final_logit_softcapping"])
    w.add_sliding_window(hf["sliding_window"])


def _gemma3(w: Writer, hf: dict) -> None:
    _gemma_scale_and_pattern(hf, 6)
    if hf.get("attn_logit_softcapping") or hf.get("final_logit_softcapping"):
        raise NotImplementedError("llama.cpp's Gemma 3 has no logit soft-capping")
    local = _rope(hf, "sliding_attention")
    if local["rope_theta"] != 10000.0 or local.get("rope_type", "default") != "default":
        raise NotImplementedError("llama.cpp runs Gemma 3's local layers with rope theta 10000")
    rope = _rope(hf, "full_attention")
    _check_rope(rope, "gemma3")
    _attention(w, hf)
    _add_rope(w, rope)
    w.add_sliding_window(hf["sliding_window"])


def _gpt2(w: Writer, hf: dict) -> None:
    if hf.get("activation_function", "gelu_new") != "gelu_new":
        raise NotImplementedError(f"llama.cpp's GPT-2 uses gelu_new, not "
                                  f"{hf['activation_function']!r}")
    w.add_block_count(hf["n_layer"])
    w.add_context_length(hf["n_positions"])
    w.add_embedding_length(hf["n_embd"])
    w.add_feed_forward_length(hf.get("n_inner") or 4 * hf["n_embd"])
    w.add_head_count(hf["n_head"])
    w.add_layer_norm_eps(hf["layer_norm_epsilon"])


def _llama_tensor(name: str, x: np.ndarray, hf: dict) -> np.ndarray:
    if name.endswith("self_attn.q_proj.weight"):
        return permute(x, hf["num_attention_heads"])
    if name.endswith("self_attn.k_proj.weight"):
        return permute(x, hf.get("num_key_value_heads", hf["num_attention_heads"]))
    return x


def _gemma_tensor(name: str, x: np.ndarray, hf: dict) -> np.ndarray:
    return x + 1.0 if name.endswith("norm.weight") else x  # llama.cpp's RMSNorm has no (1 + w)


_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def _gpt2_tensor(name: str, x: np.ndarray, hf: dict) -> np.ndarray:
    return np.ascontiguousarray(x.T) if name.endswith(_CONV1D) else x


def _same(name: str, x: np.ndarray, hf: dict) -> np.ndarray:
    return x


@dataclasses.dataclass(frozen=True)
class Arch:
    """One llama.cpp architecture: its name, metadata writer and tensor edits."""
    name: str
    metadata: Callable[[Writer, dict], None]
    tensor: Callable[[str, np.ndarray, dict], np.ndarray] = _same
    output_copies_embedding: bool = False  # GPT-2: ``output`` is written as a copy of ``token_embd``


ARCH_OF_MODEL_TYPE: dict[str, Arch] = {
    "llama": Arch("llama", _llama, _llama_tensor),
    "mistral": Arch("llama", _llama, _llama_tensor),
    "qwen2": Arch("qwen2", _qwen),
    "qwen3": Arch("qwen3", _qwen),
    "gemma": Arch("gemma", _gemma, _gemma_tensor),
    "gemma2": Arch("gemma2", _gemma2, _gemma_tensor),
    "gemma3_text": Arch("gemma3", _gemma3, _gemma_tensor),
    "gpt2": Arch("gpt2", _gpt2, _gpt2_tensor, output_copies_embedding=True),
}
_ARCH_ENUM = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}


def arch_for(hf_config: dict) -> Arch:
    """The llama.cpp architecture of a transformers config; the error lists the supported ones."""
    mt = hf_config.get("model_type")
    if mt not in ARCH_OF_MODEL_TYPE:
        raise NotImplementedError(f"model type {mt!r} has no llama.cpp architecture here; GGUF "
                                  f"export takes model types {', '.join(ARCH_OF_MODEL_TYPE)}")
    return ARCH_OF_MODEL_TYPE[mt]


def write_gguf(path: str | Path, hf_config: dict, tensors: Iterable[tuple[str, np.ndarray]],
               tokenizer: Any, *, dtype: str = "f32", source_gguf: str | Path | None = None,
               pre_tokenizer: str | None = None) -> Path:
    """Write ``tensors`` (transformers names, HF layout) of the model ``hf_config`` describes as
    a GGUF file of type ``dtype`` (see ``quants.EXPORT_DTYPES``) with ``tokenizer``'s metadata:
    copied from ``source_gguf`` when the model came from one, else converted (``pre_tokenizer``
    overrides llama.cpp's hash lookup). Returns ``path``."""
    if dtype not in quants.EXPORT_DTYPES:
        raise ValueError(f"GGUF export dtype {dtype!r}; choose from {sorted(quants.EXPORT_DTYPES)}")
    arch = arch_for(hf_config)
    target, file_type = quants.EXPORT_DTYPES[dtype]
    n_layers = hf_config.get("num_hidden_layers", hf_config.get("n_layer"))
    names = gguf.get_tensor_name_map(_ARCH_ENUM[arch.name], n_layers)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch.name, use_temp_file=True)
    try:
        arch.metadata(writer, hf_config)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if source_gguf is not None:
            vocab.add_copied_tokenizer(writer, source_gguf, tokenizer, hf_config["vocab_size"])
        else:
            vocab.add_converted_tokenizer(writer, tokenizer, hf_config, hf_config["vocab_size"],
                                          pre_tokenizer)
        for hf_name, x in tensors:
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise KeyError(f"tensor {hf_name!r} has no {arch.name} GGUF name")
            x = arch.tensor(hf_name, np.asarray(x, np.float32), hf_config)
            copy = (arch.output_copies_embedding and name == "token_embd.weight"
                    and hf_config.get("tie_word_embeddings", True))
            outs = [name] + (["output.weight"] if copy else [])
            for out in outs:
                qtype = quants.tensor_type(out, x.shape, target)
                data = quants.quantize(x, qtype)
                writer.add_tensor(out, data, raw_dtype=None if qtype in (quants.Q.F32, quants.Q.F16)
                                  else qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
