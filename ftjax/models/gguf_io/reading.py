"""GGUF import for the Llama family (architectures ``llama``, ``qwen2``, ``qwen3``).

Maps llama.cpp tensor names to transformers names, dequantises one tensor at a time with the
``gguf`` package and undoes the q/k row permutation llama.cpp's converter applies to ``llama``
models; the config comes from the GGUF metadata.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import gguf
import numpy as np

from ftjax.paths import cache_root

MODEL_TYPE_OF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PERMUTED_ARCHS = ("llama",)  # llama.cpp permutes q/k rows for rotary "normal" (not neox) mode
Q = gguf.GGMLQuantizationType
SUPPORTED_QUANTS = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K)

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _GGUF_BLOCK.fullmatch(gguf_name)
    if not m or m.group(2) not in _BLOCK_NAMES:
        raise KeyError(f"GGUF tensor {gguf_name!r} has no transformers name")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


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
    """The tokenizer (and chat template) transformers rebuilds from the GGUF metadata.

    The rebuild reads the whole file and converts the vocabulary in Python (8 s for SmolLM2's),
    so its result is saved under ``$FTJAX_CACHE/tokenizers``, keyed by the file's path, size and
    mtime and the transformers version; later loads read that folder's ``tokenizer.json``.
    """
    import transformers
    path = Path(path).resolve()
    st = path.stat()
    stamp = f"{path}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    cached = Path(cache_root()) / "tokenizers" / hashlib.sha256(stamp.encode()).hexdigest()[:20]
    if (cached / _COMPLETE).exists():
        return transformers.AutoTokenizer.from_pretrained(str(cached))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _save_cached(tokenizer, cached, stamp)
    return tokenizer


_COMPLETE = "ftjax-gguf-source.txt"


def _save_cached(tokenizer: Any, cached: Path, stamp: str) -> None:
    """Write the folder beside ``cached`` and rename it there, so a concurrent or killed writer
    never leaves half a folder; a cache that cannot be written is skipped."""
    tmp = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=cached.parent))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _COMPLETE).write_text(stamp)
        if cached.exists() and not (cached / _COMPLETE).exists():  # a writer killed half-way
            shutil.rmtree(cached)
        os.replace(tmp, cached)
    except OSError:  # read-only, or another writer got there first
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
