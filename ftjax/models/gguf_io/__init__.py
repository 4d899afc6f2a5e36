"""GGUF (llama.cpp's file format): import of Llama-family files, export of every decoder family
llama.cpp runs, with llama.cpp's own tokenizer metadata and quantised tensor types.

This package imports neither ``ftjax.models.loading`` nor ``saving``: it reads and writes
transformers-named tensors and configs, which the callers supply.
"""

from ftjax.models.gguf_io.quants import EXPORT_DTYPES
from ftjax.models.gguf_io.reading import load_tokenizer, read_gguf
from ftjax.models.gguf_io.vocab import GGUFTokenizerError, pre_tokenizer_of
from ftjax.models.gguf_io.writing import ARCH_OF_MODEL_TYPE, arch_for, write_gguf

__all__ = ["ARCH_OF_MODEL_TYPE", "EXPORT_DTYPES", "GGUFTokenizerError", "arch_for",
           "load_tokenizer", "pre_tokenizer_of", "read_gguf", "write_gguf"]
