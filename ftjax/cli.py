"""Shared command-line plumbing for the absl scripts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_arg(argv: list[str]) -> list[str]:
    """Let ``--config=NAME[:ARG]`` name a file in configs/ (``--config=tiny`` -> configs/tiny.py)."""
    out = []
    for arg in argv:
        if arg.startswith("--config=") and not arg.startswith("--config."):
            value = arg[len("--config="):]
            name, sep, rest = value.partition(":")
            if "/" not in name and not name.endswith(".py") and (CONFIG_DIR / f"{name}.py").exists():
                arg = f"--config={CONFIG_DIR / name}.py{sep}{rest}"
        out.append(arg)
    return out


def setup_environment() -> None:
    """Quiet defaults for tokenizers and TensorFlow-backed readers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(main) -> None:
    """``absl.app.run`` with config-name resolution."""
    from absl import app, logging

    setup_environment()
    if not any(a.startswith(("--verbosity", "-v=")) for a in sys.argv):
        logging.set_verbosity(logging.WARNING)  # Orbax logs every array write at INFO
    app.run(main, argv=resolve_config_arg(sys.argv))
