"""GGUF tensor types for an export: which type each tensor gets, and the quantisers.

F16 is numpy's; BF16, Q8_0, Q4_0 and Q5_0 are the ``gguf`` package's own quantisers. The
``gguf`` package has no Q4_K quantiser (it only dequantises), so ``quantize_q4_k`` writes
llama.cpp's ``block_q4_K`` layout here: 256-value super-blocks of eight 32-value sub-blocks, each
``x ~ d * sc * q - dmin * m`` with 4-bit ``q`` and 6-bit ``sc``/``m`` (the simple min/max
choice of scale and minimum, without llama.cpp's iterative refinement).

As in llama.cpp's converter, 1-D tensors, norms and position embeddings stay F32, and a tensor
whose rows do not split into the type's blocks falls back (Q4_K -> Q5_0, as llama-quantize does,
then F16).
"""

from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
# --gguf_dtype -> (tensor type of the 2-D weights, general.file_type)
EXPORT_DTYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_k": (Q.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_S),
}
_FALLBACK = {Q.Q4_K: Q.Q5_0}
_KEEP_F32 = ("_norm.weight", "position_embd.weight")


def tensor_type(gguf_name: str, shape: tuple[int, ...], target: Q) -> Q:
    """The type ``gguf_name`` (HF layout ``shape``) is written in for an export to ``target``."""
    if len(shape) <= 1 or gguf_name.endswith(_KEEP_F32):
        return Q.F32
    while target not in (Q.F32, Q.F16, Q.BF16):
        block = gguf.GGML_QUANT_SIZES[target][0]
        if shape[-1] % block == 0:
            return target
        target = _FALLBACK.get(target, Q.F16)
    return target


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 ``[..., n]`` (``n`` a multiple of 256) -> uint8 ``[..., n // 256 * 144]`` Q4_K."""
    rows = x.reshape(-1, 8, 32).astype(np.float32)  # (super-block * ..., sub-block, value)
    lo = np.minimum(rows.min(axis=-1), 0.0)
    scale = (rows.max(axis=-1) - lo) / 15.0
    mins = -lo
    d = scale.max(axis=-1, keepdims=True) / 63.0
    dmin = mins.max(axis=-1, keepdims=True) / 63.0
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    d, dmin = d16.astype(np.float32), dmin16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where(d > 0, np.round(scale / d), 0).clip(0, 63).astype(np.uint8)
        lm = np.where(dmin > 0, np.round(mins / dmin), 0).clip(0, 63).astype(np.uint8)
        step = d * ls
        q = np.where(step[..., None] > 0,
                     np.round((rows + (dmin * lm)[..., None]) / step[..., None]), 0)
    q = q.clip(0, 15).astype(np.uint8)
    scales = np.zeros((rows.shape[0], 12), np.uint8)  # llama.cpp's get_scale_min_k4 packing
    scales[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    pairs = q.reshape(-1, 4, 2, 32)  # each 64 values: low nibbles, then high nibbles
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d16.view(np.uint8), dmin16.view(np.uint8), scales, qs], axis=-1)
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // 256 * 144)


def quantize(x: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 ``x`` as ``qtype`` (raw bytes for the block types)."""
    if qtype == Q.F32:
        return x.astype(np.float32, copy=False)
    if qtype == Q.F16:
        return x.astype(np.float16)
    if qtype == Q.Q4_K:
        return quantize_q4_k(x)
    return gguf.quants.quantize(x, qtype)
