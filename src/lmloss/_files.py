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
        mode = "wb" if binary else "w"
        with os.fdopen(fd, mode, **({} if binary else {"newline": "", "encoding": "utf-8"})) as handle:
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
