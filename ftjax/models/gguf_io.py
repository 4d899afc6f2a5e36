"""GGUF in and out for the Llama family (architectures ``llama``, ``qwen2``, ``qwen3``).

Import maps llama.cpp tensor names to transformers names, dequantises one tensor at a time with
the ``gguf`` package and undoes the q/k row permutation llama.cpp's converter applies to ``llama``
models; the config comes from the GGUF metadata. Export writes F32/F16/BF16 files with the
tokenizer (byte-level BPE) and chat template in the metadata.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import gguf
import numpy as np
from flax import nnx

from ftjax.models import saving

MODEL_TYPE_OF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
ARCH_OF_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PERMUTED_ARCHS = ("llama",)  # llama.cpp permutes q/k rows for rotary "normal" (not neox) mode
Q = gguf.GGMLQuantizationType
SUPPORTED_QUANTS = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K)
EXPORT_DTYPES = {"f32": (None, gguf.LlamaFileType.ALL_F32),
                 "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16),
                 "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16)}

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _GGUF_BLOCK.fullmatch(gguf_name)
    if not m or m.group(2) not in _BLOCK_NAMES:
        raise KeyError(f"GGUF tensor {gguf_name!r} has no transformers name")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def gguf_name(name: str) -> str:
    """The inverse of ``hf_name``."""
    inverse = {v: k for k, v in _GLOBAL_NAMES.items()}
    if name in inverse:
        return inverse[name]
    m = _HF_BLOCK.fullmatch(name)
    blocks = {v: k for k, v in _BLOCK_NAMES.items()}
    if not m or m.group(2) not in blocks:
        raise KeyError(f"tensor {name!r} has no GGUF name")
    return f"blk.{m.group(1)}.{blocks[m.group(2)]}.{m.group(3)}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rotary pairs) from the transformers order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of ``permute``."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads_of(name: str, cfg: dict) -> int | None:
    if ".self_attn.q_proj." in name:
        return cfg["num_attention_heads"]
    if ".self_attn.k_proj." in name:
        return cfg["num_key_value_heads"]
    return None


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------

class GGUFSource:
    """Tensors of a GGUF file under transformers names, dequantised on demand."""

    def __init__(self, reader: gguf.GGUFReader, arch: str, cfg: dict):
        self._tensors = {hf_name(t.name): t for t in reader.tensors}
        self._arch, self._cfg = arch, cfg

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def get(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        if t.tensor_type not in SUPPORTED_QUANTS:
            raise NotImplementedError(f"GGUF tensor {t.name!r} is {t.tensor_type.name}; supported: "
                                      f"{[q.name for q in SUPPORTED_QUANTS]}")
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        x = x.reshape([int(d) for d in reversed(t.shape)])
        heads = _heads_of(name, self._cfg)
        if heads and self._arch in PERMUTED_ARCHS:
            x = unpermute(x, heads)
        return x


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf(path: str | Path) -> tuple[dict, GGUFSource]:
    """(transformers-style config dict, tensor source) of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch not in MODEL_TYPE_OF_ARCH:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: "
                         f"{sorted(MODEL_TYPE_OF_ARCH)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise NotImplementedError("GGUF files with llama3 rope factors (rope_freqs) are not supported")

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    heads, hidden = meta("attention.head_count"), meta("embedding_length")
    d = dict(model_type=MODEL_TYPE_OF_ARCH[arch],
             vocab_size=meta("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens")),
             hidden_size=hidden, intermediate_size=meta("feed_forward_length"),
             num_hidden_layers=meta("block_count"), num_attention_heads=heads,
             num_key_value_heads=meta("attention.head_count_kv", heads),
             head_dim=meta("attention.key_length") or hidden // heads,
             rope_theta=meta("rope.freq_base", 10000.0),
             rms_norm_eps=meta("attention.layer_norm_rms_epsilon", 1e-6),
             max_position_embeddings=meta("context_length", 4096),
             tie_word_embeddings="output.weight" not in names,
             attention_bias="blk.0.attn_q.bias" in names,
             bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
             eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
             pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"))
    scaling = meta("rope.scaling.type", "none")
    if scaling == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": meta("rope.scaling.factor")}
    elif scaling != "none":
        raise NotImplementedError(f"GGUF rope scaling {scaling!r} is not supported (none, linear)")
    return d, GGUFSource(reader, arch, d)


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer (and chat template) transformers rebuilds from the GGUF metadata."""
    from transformers import AutoTokenizer
    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int, cfg: Any) -> None:
    """Byte-level BPE vocabulary, merges, special ids and chat template (llama.cpp ``gpt2``)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model["type"] != "BPE" or model.get("byte_fallback"):
        raise NotImplementedError("only byte-level BPE tokenizers can be written to GGUF "
                                  f"(this one is {model['type']}, byte_fallback="
                                  f"{model.get('byte_fallback')})")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer has ids up to {max(vocab.values())} but the model "
                         f"vocabulary is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    special = set(tokenizer.all_special_ids)
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = (gguf.TokenType.CONTROL if i in special else
                    gguf.TokenType.USER_DEFINED if tok in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
           "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id}
    ids = {k: v if v is not None else getattr(cfg, f"{k}_token_id", None) for k, v in ids.items()}
    for kind, i in ids.items():
        if isinstance(i, int):
            getattr(writer, f"add_{kind}_token_id")(i)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def save_gguf(model: nnx.Module, tokenizer: Any, path: str | Path, dtype: str = "f32") -> Path:
    """Write a Llama-family causal LM as a GGUF file (``dtype``: f32, f16 or bf16)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"GGUF export dtype {dtype!r}; choose from {sorted(EXPORT_DTYPES)}")
    if saving.head_of(model) != "causal_lm":
        raise ValueError("only causal LMs can be exported to GGUF")
    cfg = saving.model_config(model)
    if getattr(cfg, "model_type", None) not in ARCH_OF_MODEL_TYPE:
        raise NotImplementedError(f"GGUF export supports model types {sorted(ARCH_OF_MODEL_TYPE)}")
    if cfg.sliding_window is not None:
        raise NotImplementedError("llama.cpp ignores sliding windows; refusing a lossy GGUF export")
    scaling = cfg.rope_scaling_dict or {}
    if scaling.get("rope_type", "default") not in ("default", "linear"):
        raise NotImplementedError(f"rope scaling {scaling['rope_type']!r} cannot be exported to GGUF")
    arch = ARCH_OF_MODEL_TYPE[cfg.model_type]
    target, file_type = EXPORT_DTYPES[dtype]
    hd = cfg.resolved_head_dim

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch, use_temp_file=True)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    _add_tokenizer(writer, tokenizer, cfg.vocab_size, cfg)

    heads = {"num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads}
    for name, spec, value, layer in saving.iter_hf_tensors(model, "causal_lm"):
        x = saving.to_host(spec, value, layer, "float32")
        n_head = _heads_of(name, heads)
        if n_head and arch in PERMUTED_ARCHS:
            x = permute(x, n_head)
        if x.ndim == 1 or target is None:  # norms and biases stay F32, as llama.cpp keeps them
            writer.add_tensor(gguf_name(name), x)
        elif target is np.float16:
            writer.add_tensor(gguf_name(name), x.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(x, target), raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
