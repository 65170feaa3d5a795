"""lmloss inside TRL's trainers (``pip install trl``; tested with TRL 1.16).

- ``LMLossGRPOTrainer`` (:mod:`.grpo`): ``trl.GRPOTrainer`` whose per-token log-probs
  and entropy come from :func:`lmloss.linear_token_logprobs` and whose loss is
  :func:`lmloss.rl.policy_loss`, normalized by the accumulation window's exact count.
- ``LMLossDPOTrainer`` (:mod:`.dpo`): ``trl.DPOTrainer`` with log-probs from
  :func:`lmloss.linear_token_logprobs` and the loss from :func:`lmloss.preference.dpo_loss`.
- ``LMLossSFTTrainer`` (:mod:`.sft`): ``trl.SFTTrainer`` whose loss is lmloss's fused
  loss with every lmloss option, in one forward per step.

Each name imports TRL only when it is first used, so ``import lmloss.integrations.trl``
needs no TRL.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> submodule defining it (add one line per trainer, and the name to __all__).
_EXPORTS = {
    "LMLossDPOTrainer": "dpo",
    "LMLossGRPOTrainer": "grpo",
    "LMLossSFTTrainer": "sft",
}

# A literal list, so that type checkers and IDEs see the lazily imported names.
__all__ = ["LMLossDPOTrainer", "LMLossGRPOTrainer", "LMLossSFTTrainer"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
