"""Run paths as ``etils.epath.Path``: local folders and ``gs://`` (or other epath) URLs alike.

A local path is made absolute (orbax wants absolute directories); a URL is left as it is, since
``Path("gs://b/run").absolute()`` would glue the current directory in front of it.
"""

from __future__ import annotations

import os

from etils import epath

from ftjax.errors import FtjaxError


class WorkdirError(FtjaxError, OSError):
    """A workdir (or another run folder) that cannot be written."""


def cache_root() -> str:
    """ftjax's local cache folder: ``$FTJAX_CACHE``, else ``~/.cache/ftjax``."""
    return os.path.expanduser(os.environ.get("FTJAX_CACHE") or os.path.join("~", ".cache", "ftjax"))


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an epath.Path: absolute when local, unchanged when a URL."""
    p = epath.Path(path)
    return p if is_url(p) else p.expanduser().absolute()


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Replace ``path``'s content so a reader (or a kill -9) never sees half a file.

    Object stores replace an object only when its upload completes, so a plain write is already
    atomic there; locally the text goes to a temporary file renamed over ``path``.
    """
    if is_url(path):
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def probe_writable(directory: epath.Path) -> None:
    """Create ``directory`` and write (then remove) a probe file, so an unwritable workdir fails
    before the first step instead of at the first checkpoint."""
    probe = directory / ".ftjax_write_probe"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:  # the backends raise OSError, PermissionError or their own errors
        reason = " ".join(str(e).split())  # one line, whatever the backend's message looks like
        raise WorkdirError(f"cannot write to the workdir {directory}: {type(e).__name__}: {reason}; "
                           "check the path and its permissions (for gs:// the credentials), "
                           "or pass another --workdir") from e
