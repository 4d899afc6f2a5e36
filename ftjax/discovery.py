"""Registries filled by their modules: import every module of a package once, so each one
registers what it defines (model families, fine-tuning methods) by existing."""

from __future__ import annotations

import functools
import importlib
import pkgutil


@functools.cache
def import_all(package: str) -> None:
    """Import every module of ``package`` (once per process)."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{package}.{info.name}")
