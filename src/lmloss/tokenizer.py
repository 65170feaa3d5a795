"""Loading a transformers tokenizer from a local directory (never from the network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["load_tokenizer"]


def load_tokenizer(path: str | Path) -> Any:
    """A transformers tokenizer from a local directory; never downloads.

    Raises:
        ValueError: the directory does not exist or holds no loadable tokenizer.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(
            f"tokenizer directory {str(path)!r} does not exist; pass a local directory saved with "
            f"tokenizer.save_pretrained(...) (nothing is downloaded)"
        )
    from transformers import AutoTokenizer  # imported here: transformers is slow to import

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"could not load a tokenizer from {str(path)!r}: {err}") from err
