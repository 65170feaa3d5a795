"""Writing files so that a crash never leaves half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], object], *, binary: bool = True) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it into place.

    A reader sees the old file or the new one, never a partial one; on an error the
    temporary file is removed and ``path`` is untouched. The file gets the usual
    permissions (``0o666`` less the umask), not ``mkstemp``'s owner-only ``0o600``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        # Text: UTF-8 whatever the locale, and newlines written as given (no "\r\n" on Windows).
        handle: IO[Any] = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="")
        with handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def check_writable_dir(path: str | os.PathLike[str], option: str) -> None:
    """Raise ``ValueError`` naming ``option`` and ``path`` if files cannot be created in ``path``.

    Tried for real (a temporary file made and removed) rather than with ``os.access``,
    which a read-only mount or root's permissions make answer wrongly.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".lmloss-write-test.", suffix=".tmp")
    except OSError as err:
        raise ValueError(f"{option} {str(path)!r} cannot be written: {err.strerror or err}") from err
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)
