"""Shared command-line plumbing for the absl scripts: config names, quiet logs, one-line errors.

A mistake in the user's input (an ``FtjaxError``, a bad or unknown flag, a config key that does
not exist, a missing file) prints ``error: <message>`` on stderr and exits with the error's code
(2); ``--verbose`` or ``FTJAX_DEBUG=1`` prints the traceback above it. Any other exception is a
bug and keeps Python's traceback (exit code 1).
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
import re
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from absl import flags

from ftjax.errors import FtjaxError

# The shipped configs (package data, so --config=NAME works from an installed wheel too).
CONFIG_DIR = Path(importlib.resources.files("ftjax.configs"))
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of user errors too "
                             "(as FTJAX_DEBUG=1 does).")
# OS errors that name a path the user gave; any other OSError is treated as a bug.
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class FlagError(FtjaxError):
    """A command line naming a flag, config file or config key that does not exist, or a bad value."""


def resolve_config_arg(argv: list[str]) -> list[str]:
    """Let ``--config=NAME[:ARG]`` name a shipped config (``--config=tiny`` -> ftjax/configs/tiny.py);
    a config that is neither a file nor a name raises ``FlagError`` naming it."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            name, sep, rest = arg[len("--config="):].partition(":")
            if "/" not in name and not name.endswith(".py") and (CONFIG_DIR / f"{name}.py").exists():
                name = str(CONFIG_DIR / f"{name}.py")
            elif not os.path.isfile(name):
                raise FlagError(_missing_config(name))
            arg = f"--config={name}{sep}{rest}"
        out.append(arg)
    return out


def _missing_config(name: str) -> str:
    if "/" in name or name.endswith(".py"):
        return f"config file {name} not found (relative paths are relative to {os.getcwd()})"
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
    close = difflib.get_close_matches(name, names, n=1)
    hint = f' Did you mean "{close[0]}"?' if close else ""
    return (f"--config={name}: no such file, and no config named {name!r} in {CONFIG_DIR} "
            f"({', '.join(names)}).{hint}")


def setup_environment() -> None:
    """Quiet defaults for tokenizers and TensorFlow-backed readers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(main: Callable[[list[str]], Any]) -> None:
    """``absl.app.run`` with config-name resolution and one-line errors for user mistakes."""
    from absl import app, logging

    setup_environment()
    _help_from(sys.modules[main.__module__])
    if not any(a.startswith(("--verbosity", "-v=")) for a in sys.argv):
        logging.set_verbosity(logging.WARNING)  # Orbax logs every array write at INFO
    try:
        app.run(main, argv=resolve_config_arg(sys.argv), flags_parser=_parse_flags)
    except Exception as e:  # user errors become one line; anything else is re-raised as is
        if not isinstance(e, (FtjaxError, *_PATH_ERRORS)):
            raise
        if _debug(sys.argv):
            traceback.print_exc()
        print(f"error: {_message(e)}", file=sys.stderr)
        sys.exit(e.exit_code if isinstance(e, FtjaxError) else 2)


def _help_from(command: ModuleType) -> None:
    """Make ``--help`` print ``command``'s docstring and flags whichever file is ``__main__`` (a
    console script, scripts/NAME.py): absl shows only those of ``__main__``."""
    main = sys.modules["__main__"]
    if command is main:
        return
    main.__doc__ = command.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(command.__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def _debug(argv: list[str]) -> bool:
    if os.environ.get("FTJAX_DEBUG", "") not in ("", "0"):
        return True
    return _VERBOSE.value if flags.FLAGS.is_parsed() else "--verbose" in argv


def _message(error: BaseException) -> str:
    """The error's own text (``str(KeyError)`` would quote it; OSErrors name the path)."""
    if isinstance(error, FtjaxError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error)


# ----------------------------------------------------------------------------- flag parsing

def _parse_flags(argv: list[str]) -> list[str]:
    """``FLAGS(argv)``; a bad flag or a config key that does not exist raises ``FlagError``."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # unknown flag, bad value, missing required flag
        raised = [x for x in _chain(e) if isinstance(x, FtjaxError)]
        if raised:  # by the config file; ml_collections and absl wrap it in a ValueError each
            raise raised[-1]
        raise FlagError(str(e)) from e
    except (KeyError, AttributeError) as e:  # ml_collections: a config key that does not exist
        message = _config_key_message(e, argv)
        if message is None:
            raise
        raise FlagError(message) from e


def _config_key_message(error: BaseException, argv: list[str]) -> str | None:
    """One line for ml_collections' "no such key" error (from an override or from the config
    file itself), or None when ``error`` did not come from ml_collections."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames or "ml_collections" not in frames[-1].filename:
        return None
    chain = _chain(error)
    text = "\n".join(str(x.args[0]) for x in chain if x.args)
    named = re.search(r'Key "(.+?)" does not exist', text)
    key = named.group(1) if named else (chain[-1].args or [None])[0]
    if not isinstance(key, str):
        return None
    guess = re.search(r'Did you mean "(.+?)" instead of', text)
    guess = guess.group(1) if guess else None
    first = next(i for i, f in enumerate(frames) if "ml_collections" in f.filename)
    in_file = [f for f in frames[first:] if "ml_collections" not in f.filename]
    if in_file:  # raised while the config file ran get_config()
        f = in_file[-1]
        hint = f' Did you mean "{guess}"?' if guess else ""
        return f"{f.filename}:{f.lineno}: config key {key!r} does not exist (`{f.line}`).{hint}"
    for override in _overrides(argv):
        parts = override.split(".")
        if key in parts:
            if guess:
                parts[parts.index(key)] = guess
            hint = f' Did you mean "{".".join(parts)}"?' if guess else ""
            return f"config key {override} does not exist.{hint}"
    return f"config key {key!r} does not exist." + (f' Did you mean "{guess}"?' if guess else "")


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from or during, outermost first."""
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    return chain


def _overrides(argv: list[str]) -> list[str]:
    """Dotted paths of the ``--config.a.b=V`` overrides on the command line."""
    return [a[len("--config."):].partition("=")[0] for a in argv if a.startswith("--config.")]
