"""lmloss inside TRL's trainers (``pip install trl``; tested with TRL 1.16).

- ``LMLossSFTTrainer`` (:mod:`.sft`): ``trl.SFTTrainer`` whose loss is lmloss's fused
  loss with every lmloss option, in one forward per step.

Each name imports TRL only when it is first used, so ``import lmloss.integrations.trl``
needs no TRL.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> submodule defining it (add one line per trainer).
_EXPORTS = {
    "LMLossSFTTrainer": "sft",
}

__all__ = ["LMLossSFTTrainer"]  # the keys of _EXPORTS


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
