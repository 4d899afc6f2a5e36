"""The one base class for errors a user can fix: the command line prints them as one line.

Every error that names a problem in the user's input (config, data, mesh, checkpoint, export,
a missing file) derives from ``FtjaxError``; ``ftjax.cli.run`` prints its message on stderr and
exits with ``exit_code`` instead of showing a traceback (``--verbose`` or ``FTJAX_DEBUG=1``
shows it).
"""

from __future__ import annotations


class FtjaxError(Exception):
    """A problem in the user's input, with a message that names it, its place and a fix."""

    exit_code = 2
