"""``trainer_loss``: lmloss on a model's logits as ``transformers.Trainer``'s ``compute_loss_func``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from typing_extensions import Unpack

from lmloss.integrations.transformers.loss import ModelLossKeywords, logits_loss, loss_spec
from lmloss.integrations.transformers.outputs import logits_of
from lmloss.integrations.transformers.tokens import check_token_ids, mask_token_ids

__all__ = ["trainer_loss"]


def trainer_loss(
    *, ignore_token_ids: Iterable[int] = (), **loss_options: Unpack[ModelLossKeywords]
) -> Callable[..., torch.Tensor]:
    """A ``compute_loss_func`` for ``transformers.Trainer``: lmloss on the model's logits.

    ``Trainer(model=model, compute_loss_func=trainer_loss(), ...)``: ``Trainer`` takes the
    ``labels`` out of the batch, calls the model (which returns its logits), and calls
    ``loss_func(outputs, labels, num_items_in_batch=n)``; this computes
    ``lmloss.causal_lm_loss(outputs.logits, labels, num_items_in_batch=n, ...)``. With a
    ``compute_loss_func``, ``Trainer`` always counts ``num_items_in_batch`` over the step,
    never divides by the accumulation steps, and multiplies by the number of processes
    under ``average_tokens_across_devices``: the same normalisation as :func:`apply`.

    Use :func:`apply` instead to avoid the logits; this is for models you do not want to
    wrap, or when the logits are wanted anyway. A model's softcap is already in its logits.
    For TRL's ``SFTTrainer`` use ``lmloss.integrations.trl.LMLossSFTTrainer``: TRL 1.16
    computes its loss with its own fused head (bypassing :func:`apply`, which then
    raises) and runs a second forward for a ``compute_loss_func`` (deprecated there).

    Args:
        ignore_token_ids: ids never counted as targets (e.g. ``placeholder_token_ids(model)``);
            make the collator mask them too, so that ``Trainer``'s count agrees.
        **loss_options: ``ignore_index``, ``label_smoothing``, ``z_loss``, ``token_loss``,
            ``focal_gamma``: as in :func:`lmloss.causal_lm_loss`, with its defaults.

    Returns:
        ``loss_func(outputs, labels, num_items_in_batch=None) -> Tensor`` (a float32 scalar);
        ``outputs.logits`` ``[batch, seq_len, vocab]``, ``labels`` ``[batch, seq_len]``.

    Raises:
        ValueError, TypeError: an option is bad (the message names it).
    """
    # The other per-token options are fixed here: transformers shifts, means over the
    # step's targets, and the softcap is the model's own (see SPEC_OPTIONS_FIXED).
    spec = loss_spec("trainer_loss", loss_options)
    ids = check_token_ids(ignore_token_ids)

    def loss_func(outputs: Any, labels: torch.Tensor | None, num_items_in_batch: Any = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("trainer_loss: the batch has no 'labels' (Trainer passes labels=None)")
        logits = logits_of(outputs)
        if logits is None:
            raise ValueError(
                "trainer_loss: the model output has no logits; a model with lmloss applied computes its loss "
                "itself, so pass it to Trainer without compute_loss_func"
            )
        labels = mask_token_ids(labels.to(logits.device), ids, spec.ignore_index)
        return logits_loss(logits, labels, spec, shift=True, num_items_in_batch=num_items_in_batch)

    return loss_func
