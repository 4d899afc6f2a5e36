"""The one base class for errors a user can fix: the command line prints them as one line.

Every error that names a problem in the user's input (config, data, mesh, checkpoint, export,
a missing file) derives from ``FtjaxError``; ``ftjax.cli.run`` prints its message on stderr and
exits with ``exit_code`` instead of showing a traceback (``--verbose`` or ``FTJAX_DEBUG=1``
shows it).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class FtjaxError(Exception):
    """A problem in the user's input, with a message that names it, its place and a fix."""

    exit_code = 2


class MissingExtraError(FtjaxError):
    """An optional feature whose packages are not installed: the message names the pip extra."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``import module`` for an optional ``feature``, or a ``MissingExtraError`` that says to
    ``pip install 'ftjax[extra]'`` when the module is not installed at all."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0]:  # the module is there, one of its own imports is not
            raise
        raise MissingExtraError(f"{feature} needs the {module.split('.')[0]!r} package, which is not "
                                f"installed: pip install 'ftjax[{extra}]'") from None
