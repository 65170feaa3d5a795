"""Detecting TRL's fused LM head, whose loss path bypasses the model's ``forward``."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["trl_fused_head_installed"]


def trl_fused_head_installed(model: nn.Module) -> bool:
    """Whether TRL's ``add_fused_lm_head`` wrapped ``model.forward`` (possibly under other wrappers).

    TRL's trainers (``SFTTrainer`` from 1.16) install it; its loss path bypasses
    ``apply``'s forward, so ``apply`` refuses to train under it.
    """
    fn: Any = model.__dict__.get("forward")
    for _ in range(8):  # accelerate and others wrap forward with functools.wraps (``__wrapped__``)
        fn = getattr(fn, "__func__", fn)
        code = getattr(fn, "__code__", None)  # not __qualname__: functools.wraps copies the model's
        if code is not None and (
            "add_fused_lm_head" in getattr(code, "co_qualname", "")  # Python 3.11+
            or (code.co_name == "_fused_forward" and "trl" in code.co_filename)
        ):
            return True
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return False
    return False
