"""Checkpoints that a crash can never leave half-written.

A checkpoint is a directory ``checkpoints/step-NNNNNNN/`` holding the model
(``model.safetensors`` + ``config.json``, loadable with ``from_pretrained``), the
tokenizer, and ``trainer_state.pt`` (optimizer, scheduler, monitor, counters). It is
written under a temporary name and renamed into place only when every file is
complete; then ``checkpoints/latest`` (itself written atomically) names it. A run
killed at any moment leaves either the previous checkpoint or the new one, never a
partial directory under a final name.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from lmloss._files import atomic_write

__all__ = [
    "CHECKPOINTS",
    "CheckpointWriteError",
    "check_model_file",
    "latest_checkpoint",
    "load_trainer_state",
    "save_checkpoint",
]

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.pt"
MODEL_FILE = "model.safetensors"
_PARTIAL = ".partial"
_NAME = re.compile(r"step-\d+")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, lost permission): the run failed.

    The message names the checkpoint and the reason in one line; the previous
    checkpoint is untouched.
    """


def save_checkpoint(
    run_dir: str | os.PathLike[str], step: int, model: Any, tokenizer: Any, state: dict[str, Any], *, keep: int
) -> Path:
    """Write the checkpoint of ``step``, point ``latest`` at it, keep the ``keep`` newest."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    partial = root / f".{final.name}{_PARTIAL}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        _quiet_transformers()
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        torch.save(state, partial / STATE_FILE)
        _install(partial, final)
    except Exception as err:
        shutil.rmtree(partial, ignore_errors=True)
        # safetensors raises its own SafetensorError, torch.save a RuntimeError ("enforce
        # fail ... file write failed"), plain writes an OSError: one message for all three.
        raise CheckpointWriteError(f"could not write checkpoint {final}: {_reason(err)}") from err
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        atomic_write(root / LATEST, lambda f: f.write(final.name + "\n"), binary=False)
    except OSError as err:
        raise CheckpointWriteError(f"could not write {root / LATEST}: {_reason(err)}") from err
    _prune(root, keep, final)
    return final


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror + (f": {err.filename}" if err.filename else "")
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def _quiet_transformers() -> None:
    """transformers draws a progress bar per saved shard; it would cut through ours."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _install(partial: Path, final: Path) -> None:
    """Rename ``partial`` to ``final``; an older ``final`` (a resumed run saving the same
    step again) is moved aside first, since a directory cannot be renamed over another."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)


def _prune(root: Path, keep: int, current: Path) -> None:
    complete = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in complete[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / MODEL_FILE).is_file() and (path / "config.json").is_file()


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``latest`` names, or else the newest complete one; ``None`` if none.

    ``latest`` must hold the bare name of a checkpoint of this directory (``step-NNNNNNN``):
    a path (``../../elsewhere/step-3``) is refused with a ``ValueError``, never followed.
    """
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{pointer}: cannot be read ({err}); delete it to resume from the newest complete checkpoint"
            ) from err
        if not _NAME.fullmatch(name):
            raise ValueError(
                f"{pointer} names {name[:100]!r}, not a checkpoint inside {root} (step-NNNNNNN); "
                f"delete it to resume from the newest complete checkpoint"
            )
        named = root / name
        if is_complete(named):
            return named
    complete = [p for p in sorted(root.glob("step-*")) if p.is_dir() and is_complete(p)]
    return complete[-1] if complete else None


def remove_partials(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete what an interrupted save left behind (temporary directories only)."""
    root = Path(run_dir) / CHECKPOINTS
    leftovers = [p for p in root.glob(".step-*") if p.is_dir()] if root.is_dir() else []
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def load_trainer_state(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """``trainer_state.pt`` of a checkpoint (plain containers and tensors only).

    A file that cannot be read (cut, corrupt, not a state) raises ``ValueError`` naming it.
    """
    path = Path(checkpoint) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # zip, pickle and EOF errors of a damaged file all mean the same here
        raise ValueError(
            f"{path}: not a readable trainer state ({_reason(err)}); resume from an earlier "
            f"checkpoint (write its name into {Path(checkpoint).parent / LATEST})"
        ) from err
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path}: not a trainer state of lmloss train (no 'step')")
    return state


def check_model_file(checkpoint: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` naming ``model.safetensors`` if its header cannot be read (empty, cut, corrupt)."""
    from safetensors import safe_open

    path = Path(checkpoint) / MODEL_FILE
    try:
        with safe_open(str(path), framework="pt") as handle:
            if not list(handle.keys()):
                raise ValueError("no tensor")
    except Exception as err:
        raise ValueError(
            f"{path}: not a readable model ({_reason(err)}); resume from an earlier checkpoint "
            f"(write its name into {Path(checkpoint).parent / LATEST})"
        ) from err
