"""The run directory of ``lmloss train``: what a run writes there, and who may write it.

A run owns a fixed set of names (:data:`RUN_FILES`, listed here and nowhere else), so
``--overwrite`` deletes exactly those and refuses a directory holding anything else:
pointed by mistake at a model directory or a home folder, it names what it found
instead of deleting it. :class:`RunLock` keeps two runs out of one directory: the
lock file records the owner's pid (and its start time), so a lock left behind by a
killed process is recognised as stale and taken over.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from lmloss._files import check_writable_dir

__all__ = [
    "LOCK_FILE",
    "RUN_FILES",
    "RunDirError",
    "RunLock",
    "clear_run",
    "foreign_entries",
    "has_run",
    "prepare_output_dir",
]

LOCK_FILE = ".lmloss.lock"
# Every name a run writes at the top of its directory (files and folders); nothing else is its.
RUN_FILES = frozenset(
    {
        "config.json",
        "metrics.jsonl",
        "metrics.csv",
        "summary.json",
        "report.md",
        "samples.json",
        "plots",
        "checkpoints",
        "tensorboard",
        LOCK_FILE,
    }
)
# Inside the folders a run owns, what it writes there.
_OWN_INSIDE = {"plots": (".png", ".tmp"), "checkpoints": ("step-", ".step-", "latest", ".latest.")}


class RunDirError(ValueError):
    """The run directory cannot be used as asked (bad input: the CLI exits 2)."""


def prepare_output_dir(path: str, *, resume: bool = False) -> Path:
    """``--output-dir`` as a directory that exists and can be written (made if missing,
    unless ``resume``: there is nothing to continue in a directory that does not exist).

    Raises :class:`RunDirError` for an empty path, a file, a missing directory to resume,
    or a directory that cannot be written, naming the path.
    """
    if not str(path).strip():
        raise RunDirError("--output-dir is empty: name a directory for the run (e.g. runs/train)")
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise RunDirError(f"--output-dir {path!r} is a file, not a directory")
    if resume and not root.exists():
        raise RunDirError(
            f"--resume: {path!r} does not exist, so there is no run to continue (start the run without --resume)"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"--output-dir {path!r} cannot be created: {err.strerror or err}") from err
    check_writable_dir(root, "--output-dir")
    return root


def has_run(root: Path) -> bool:
    """Whether ``root`` holds (part of) a run: its config or its checkpoints."""
    return (root / "config.json").is_file() or (root / "checkpoints").is_dir()


def foreign_entries(root: Path) -> list[str]:
    """The entries of ``root`` that no run writes (``notes/``, ``plots/mine.txt``), sorted."""
    found = []
    for entry in sorted(root.iterdir()):
        if _is_temporary(entry.name):
            continue
        if entry.name not in RUN_FILES:
            found.append(entry.name + ("/" if entry.is_dir() else ""))
        elif entry.name in _OWN_INSIDE:
            if not entry.is_dir():
                found.append(entry.name)
                continue
            prefixes = _OWN_INSIDE[entry.name]
            found += [
                f"{entry.name}/{inner.name}"
                for inner in sorted(entry.iterdir())
                if not any(inner.name.startswith(p) or inner.name.endswith(p) for p in prefixes)
            ]
    return found


def clear_run(root: Path) -> list[str]:
    """Delete the run in ``root`` (``--overwrite``): its own files only, keeping the lock.

    Raises :class:`RunDirError` naming what else the directory holds; nothing is
    deleted then. Returns the names deleted.
    """
    foreign = foreign_entries(root)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise RunDirError(
            f"--overwrite: {root} holds files no lmloss run writes ({shown}); refusing to delete "
            f"it: pass an --output-dir of its own"
        )
    deleted = []
    for entry in sorted(root.iterdir()):
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        deleted.append(entry.name)
    return deleted


def _is_temporary(name: str) -> bool:
    """A file :func:`lmloss._files.atomic_write` left half-written (``.summary.json.x1y2.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


# ------------------------------------------------------------------------------------ lock


class RunLock:
    """An exclusive claim on a run directory for the life of a run (main process only).

    ``acquire`` creates ``LOCK_FILE`` atomically (``O_EXCL``); if it exists and its
    owner is alive on this host, it raises :class:`RunDirError` naming the pid; if the
    owner is gone (killed, crashed), the stale lock is replaced.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None:
                    raise RunDirError(
                        f"{self.path.parent} is in use by another lmloss run (pid {owner}); wait "
                        f"for it to finish or pass another --output-dir"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(me + "\n")
            self.held = True
            return
        raise RunDirError(f"{self.path.parent}: could not take the lock {self.path.name} (another run took it)")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _owner(self) -> int | None:
        """The pid of a live owner of the lock, or ``None`` if the lock is stale."""
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
            pid, host, started = int(record["pid"]), str(record["host"]), record.get("started")
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable or cut mid-write by a kill: nobody can own it
        if host != socket.gethostname():
            return pid  # another machine's process: cannot be checked from here, so it counts as alive
        if not _alive(pid):
            return None
        # The pid may have been reused by an unrelated process since: compare start times.
        return None if started is not None and _start_time(pid) not in (None, started) else pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), else ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])
