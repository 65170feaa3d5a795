"""The loss options the integration takes, and the loss on a model's logits.

``apply`` and ``trainer_loss`` take the per-token options of :class:`lmloss.LossSpec`
except those a transformers causal-LM loss fixes (``SPEC_OPTIONS_FIXED``); both keep
them as one checked spec and call the public loss functions with its typed fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lmloss._spec import SPEC_OPTIONS, LossSpec, TokenLoss
from lmloss.reference import causal_lm_loss

__all__ = ["SPEC_OPTIONS_FIXED", "count_on_device", "logits_loss", "loss_spec", "options_text"]

# The LossSpec options that apply() and trainer_loss() do not take, and why: the
# model's loss always shifts and means over the step's targets (num_items_in_batch
# from Trainer), and a model's logit softcap is its own config's.
SPEC_OPTIONS_FIXED = {
    "shift": "transformers' causal-LM loss always shifts the labels",
    "reduction": "a model's loss is the mean over the step's targets",
    "normalize": "Trainer counts num_items_in_batch in tokens",
    "softcap": "the model's final_logit_softcapping",
}


def loss_spec(
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    token_loss: TokenLoss,
    focal_gamma: float | None,
) -> LossSpec:
    """The checked spec of the options ``apply``/``trainer_loss`` take (the others at their defaults).

    Raises:
        ValueError, TypeError: an option is bad (the message names it).
    """
    spec = LossSpec(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        token_loss=token_loss,
        focal_gamma=focal_gamma,
    )
    # Checked as given (an int coefficient is a real number); kept as floats, as the loss sees them.
    return dataclasses.replace(spec, label_smoothing=float(spec.label_smoothing), z_loss=float(spec.z_loss))


def options_text(spec: LossSpec) -> str:
    """The options of ``spec`` the integration takes, as ``{'name': value, ...}`` (for messages)."""
    return str({name: getattr(spec, name) for name in SPEC_OPTIONS if name not in SPEC_OPTIONS_FIXED})


def count_on_device(num_items: Any, like: torch.Tensor) -> Any:
    """A tensor count moved to the loss's device (Trainer keeps it on the batch's); other counts as given."""
    return num_items.to(like.device) if isinstance(num_items, torch.Tensor) else num_items


def logits_loss(
    logits: torch.Tensor, labels: torch.Tensor, spec: LossSpec, *, shift: bool, num_items_in_batch: Any
) -> torch.Tensor:
    """:func:`lmloss.causal_lm_loss` of ``logits`` ``[..., T, V]`` and ``labels`` ``[..., T]`` with ``spec``'s options.

    ``labels`` and a tensor ``num_items_in_batch`` are moved to the logits' device.
    Returns a float32 scalar: the sum over targets / ``num_items_in_batch`` (or the target count).
    """
    return causal_lm_loss(
        logits,
        labels.to(logits.device),
        shift=shift,
        num_items_in_batch=count_on_device(num_items_in_batch, logits),
        ignore_index=spec.ignore_index,
        label_smoothing=spec.label_smoothing,
        z_loss=spec.z_loss,
        token_loss=spec.token_loss,
        focal_gamma=spec.focal_gamma,
    )
