"""Input checks of the vocab-parallel functions (:mod:`lmloss.parallel`).

Inputs that every rank holds alike (hidden states, labels, options) are checked
with a raise: every rank fails alike, without communication. A rank's own shard
is checked into a message instead (``None``: fine), which the caller sends through
the fail-together protocol, so that no other rank waits in a collective for it.
"""

from __future__ import annotations

import torch

from lmloss._validation import (
    check_tensor,
)

__all__ = [
    "bias_problem",
    "check_hidden",
    "logits_problem",
    "weight_problem",
]


def check_hidden(hidden: object) -> torch.Tensor:
    hidden = check_tensor("hidden", hidden)
    if not hidden.is_floating_point() or hidden.ndim < 2:
        raise ValueError(
            f"hidden must be a floating-point tensor of shape [..., T, D], got dtype {hidden.dtype} "
            f"and shape {tuple(hidden.shape)}"
        )
    return hidden


def weight_problem(hidden: torch.Tensor, weight: object) -> str | None:
    """What is wrong with this rank's ``weight_shard`` (``None``: nothing)."""
    if not isinstance(weight, torch.Tensor):
        return f"weight_shard must be a torch.Tensor, got {type(weight).__name__}"
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        return (
            f"weight_shard must have shape [V_r, D] with D = hidden.shape[-1] = {hidden.shape[-1]} "
            f"(rows of an lm_head.weight), got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        return f"hidden ({hidden.dtype}) and weight_shard ({weight.dtype}) must have the same dtype"
    if weight.device != hidden.device:
        return f"weight_shard is on {weight.device} but hidden is on {hidden.device}"
    return None


def logits_problem(logits: object, labels: torch.Tensor) -> str | None:
    """What is wrong with this rank's ``logits_shard`` (``None``: nothing)."""
    if not isinstance(logits, torch.Tensor):
        return f"logits_shard must be a torch.Tensor, got {type(logits).__name__}"
    if not logits.is_floating_point() or logits.ndim < 2:
        return (
            f"logits_shard must be a floating-point tensor of shape [..., T, V_r], got dtype "
            f"{logits.dtype} and shape {tuple(logits.shape)}"
        )
    if logits.shape[:-1] != labels.shape:
        return (
            f"logits_shard has shape {tuple(logits.shape)} but its leading dimensions must match labels, "
            f"{tuple(labels.shape)}"
        )
    if logits.device != labels.device:
        return f"logits_shard is on {logits.device} but labels are on {labels.device}"
    return None


def bias_problem(weight: torch.Tensor, bias: object) -> str | None:
    """What is wrong with this rank's ``[V_r]`` bias shard (``None``: nothing, or no bias)."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        return f"bias must be a torch.Tensor or None, got {type(bias).__name__}"
    if bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype or bias.device != weight.device:
        return (
            f"bias must be this rank's [V_r] = [{weight.shape[0]}] rows of the lm_head bias, like weight_shard "
            f"({weight.dtype}, {weight.device}), got shape {tuple(bias.shape)} {bias.dtype} on {bias.device}"
        )
    return None
