"""Data preparation and input pipelines: ``pipeline.build(config.data, tokenizer)``."""

from __future__ import annotations

import importlib.resources


def asset(name: str) -> str:
    """Path of a file shipped in ``ftjax/data/assets`` (e.g. ``"sst2/train.txt"``)."""
    return str(importlib.resources.files(__name__) / "assets" / name)
