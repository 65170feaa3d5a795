"""The loss options the integration takes, and the loss on a model's logits.

``apply`` and ``trainer_loss`` take the per-token options of :class:`lmloss.LossSpec`
except those a transformers causal-LM loss fixes (``SPEC_OPTIONS_FIXED``); both keep
them as one checked spec and call the public loss functions with its typed fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypedDict

import torch

from lmloss._spec import SPEC_OPTIONS, LossSpec, TokenLoss, spec_from_keywords
from lmloss.reference import causal_lm_loss

__all__ = [
    "SPEC_OPTIONS_FIXED",
    "SPEC_OPTIONS_TAKEN",
    "ModelLossKeywords",
    "count_on_device",
    "logits_loss",
    "loss_spec",
    "options_text",
]

# The LossSpec options that apply() and trainer_loss() do not take, and why: the
# model's loss always shifts and means over the step's targets (num_items_in_batch
# from Trainer), and a model's logit softcap is its own config's.
SPEC_OPTIONS_FIXED = {
    "shift": "transformers' causal-LM loss always shifts the labels",
    "reduction": "a model's loss is the mean over the step's targets",
    "normalize": "Trainer counts num_items_in_batch in tokens",
    "softcap": "the model's final_logit_softcapping",
}


class ModelLossKeywords(TypedDict, total=False):
    """The per-token options ``apply`` and ``trainer_loss`` take, as keywords (``**loss_options``):
    those of :class:`lmloss.LossKeywords` less ``SPEC_OPTIONS_FIXED``, with the spec's defaults."""

    ignore_index: int
    label_smoothing: float
    z_loss: float
    token_loss: TokenLoss
    focal_gamma: float | None


SPEC_OPTIONS_TAKEN: tuple[str, ...] = tuple(name for name in SPEC_OPTIONS if name not in SPEC_OPTIONS_FIXED)


def loss_spec(where: str, options: Mapping[str, object]) -> LossSpec:
    """The checked spec of the ``**loss_options`` that ``where`` (``apply``, ``trainer_loss``)
    took; the fixed options keep their defaults.

    Raises:
        TypeError: an option the integration does not take (a fixed one: with the reason).
        ValueError, TypeError: an option is bad (the message names it).
    """
    spec = spec_from_keywords(where, options, SPEC_OPTIONS_TAKEN, SPEC_OPTIONS_FIXED)
    # Checked as given (an int coefficient is a real number); kept as floats, as the loss sees them.
    return dataclasses.replace(spec, label_smoothing=float(spec.label_smoothing), z_loss=float(spec.z_loss))


def options_text(spec: LossSpec) -> str:
    """The options of ``spec`` the integration takes, as ``{'name': value, ...}`` (for messages)."""
    return str({name: getattr(spec, name) for name in SPEC_OPTIONS_TAKEN})


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
