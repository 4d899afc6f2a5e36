"""UTF-8 bytes per token id, so bits per byte can be summed on device next to the NLL.

Exact for byte-level BPE vocabularies (GPT-2, Llama 3, Qwen, SmolLM: one vocabulary character
per byte) and SentencePiece ones (``▁`` is a space, ``<0xNN>`` one byte). WordPiece drops the
spaces between words, so its counts are a slight underestimate. Special tokens count 0.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _is_byte_level(tokenizer: Any) -> bool:
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(d.get("type") == "ByteLevel" for d in parts)


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """``lengths[id]`` = UTF-8 bytes of the text token ``id`` stands for."""
    vocab = tokenizer.get_vocab()
    lengths = np.zeros(max(vocab.values()) + 1, np.int32)
    byte_level = _is_byte_level(tokenizer)
    special = set(tokenizer.all_special_ids)
    for token, i in vocab.items():
        if i in special:
            continue
        if byte_level:
            lengths[i] = len(token)
        elif _BYTE_TOKEN.fullmatch(token):
            lengths[i] = 1
        else:
            lengths[i] = len(token.removeprefix("##").replace("\u2581", " ").encode())
    return lengths
