"""A model's outputs: reading their logits, returning them with lmloss's loss."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["logits_of", "with_loss"]


def logits_of(outputs: Any) -> torch.Tensor | None:
    """The logits of a model output (``ModelOutput``, dict, or ``return_dict=False`` tuple), or None."""
    if isinstance(outputs, Mapping):
        return outputs.get("logits")
    if isinstance(outputs, (tuple, list)) and outputs:
        return outputs[0]
    return getattr(outputs, "logits", None)


def with_loss(out: Any, loss: torch.Tensor, *, keep_logits: bool) -> Any:
    """The model's output with ``loss`` set (and ``logits=None`` unless kept).

    A ``ModelOutput`` is rebuilt rather than edited so that its key order, and so
    ``out[0]`` / ``to_tuple()``, is what transformers gives (loss first).

    Raises:
        TypeError: ``out`` is neither a dataclass mapping with a ``loss`` field nor a tuple.
    """
    if dataclasses.is_dataclass(out) and isinstance(out, Mapping):
        values = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        if "loss" not in values:
            raise TypeError(f"lmloss: {type(out).__name__} has no 'loss' field to return the loss in")
        values["loss"] = loss
        if not keep_logits:
            values["logits"] = None
        return type(out)(**values)
    if isinstance(out, tuple):  # return_dict=False: (logits, ...) without a loss
        return (loss,) + (out if keep_logits else out[1:])
    raise TypeError(f"lmloss: unsupported model output type {type(out).__name__}")
