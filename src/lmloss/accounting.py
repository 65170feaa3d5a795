"""Step accounting: the divisor that makes accumulated micro-batches equal one big batch.

(Formerly ``lmloss.normalize``, which remains as a deprecated alias.)

The mean loss of an optimizer step is ``sum of all target losses / number of all
targets``. A mean of per-micro-batch means is *not* that (the October 2024
gradient-accumulation bug in transformers) unless every micro-batch has the same
number of targets. The fix: every micro-batch divides its *sum* by the target count
of the whole step, across micro-batches and data-parallel ranks.

Under DDP (and FSDP), gradients are *averaged* over ranks, i.e. divided by the world
size once more; each rank therefore multiplies its loss by the world size::

    for mb in lmloss.micro_batches(step_batches, group=dist.group.WORLD):
        logits = model(mb.batch["input_ids"]).logits
        loss = lmloss.causal_lm_loss(logits, mb.batch["labels"],
                                     num_items_in_batch=mb.num_items_in_batch)
        (loss * mb.loss_scale).backward()   # loss_scale == world size

    # per rank: loss_r = sum_r / N_total * W; DDP averages: sum_r(loss_r) / W = sum / N_total

The same for a policy loss (:func:`lmloss.rl.policy_loss`): ``loss_type=`` makes the
count what that loss type divides by, read from the completion mask::

    for mb in lmloss.micro_batches(step, labels_key="completion_mask", loss_type="dapo", group=...):
        out = lmloss.rl.policy_loss(..., mb.batch["completion_mask"], loss_type="dapo",
                                    num_items_in_batch=mb.num_items_in_batch)
        (out.loss * mb.loss_scale).backward()
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist

from lmloss._engine.plan import align, target_class_weights
from lmloss._spec import NORMALIZATIONS, Normalize
from lmloss._validation import (
    check_choice,
    check_class_weights,
    check_int,
    check_labels,
    check_token_weights,
)
from lmloss.rl import LOSS_TYPES, SEQUENCE_LOSS_TYPES

__all__ = ["MicroBatch", "count_targets", "micro_batches"]

BatchT = TypeVar("BatchT")


def count_targets(
    labels: torch.Tensor,
    *,
    shift: bool = True,
    ignore_index: int = -100,
    token_weights: torch.Tensor | None = None,
    normalize: Normalize = "token",
    group: dist.ProcessGroup | None = None,
    loss_type: str | None = None,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The number of items ``causal_lm_loss`` divides by, for ``num_items_in_batch``.

    Args:
        labels: ``[..., T]`` integer labels, as passed to the loss.
        shift: as in the loss: with ``True``, position 0 of each row is never a
            target (``[5, 6, 7, 8]`` has 3 targets, not 4).
        ignore_index: label value that is not a target.
        token_weights: ``[..., T]`` weights or loss mask aligned with ``labels``;
            the count becomes the weight sum of the targets.
        normalize: ``"token"`` counts targets; ``"sequence"`` counts the rows of
            ``labels`` that have at least one target.
        group: a ``torch.distributed`` process group (e.g. ``dist.group.WORLD``) to
            sum the count over; ``None`` counts locally. Every rank of the group must
            call this (it is a collective).
        loss_type: a :func:`lmloss.rl.policy_loss` loss type: then ``labels`` is the
            policy loss's ``[B, T]`` completion ``mask`` (bool or 0/1, already aligned;
            ``shift``, ``ignore_index``, ``token_weights`` and ``normalize`` do not apply)
            and the count is what that type divides by: the scored tokens (``dapo``,
            ``cispo``, ``bnpo``, ``vespo``) or the sequences, every row (``grpo``, ``sapo``,
            ``dr_grpo``, ``luspo``).
        class_weights: ``[V]`` class weights as passed to the loss: each target then
            counts its class weight (torch's weighted mean divides by their sum).

    Returns:
        A 0-dim tensor on ``labels.device``: ``int64`` for counts, ``float32`` for
        weight sums. No host synchronisation happens here.
    """
    if loss_type is not None:
        count = _policy_count(labels, loss_type)
        return count if group is None else _all_reduce_sum(count, group)
    labels = check_labels(labels)
    check_int("ignore_index", ignore_index)
    check_choice("normalize", normalize, NORMALIZATIONS)
    if labels.ndim == 0:
        raise ValueError("labels must have shape [..., T] (at least 1-D), got a 0-dim tensor")
    weights = None if token_weights is None else check_token_weights(token_weights, labels)
    classes = None
    if class_weights is not None:
        classes = check_class_weights(class_weights, None, labels.device, torch.float64)
    dtype = torch.float32 if weights is not None or classes is not None else torch.int64
    # The same alignment as the loss, so the two can never disagree.
    targets, item_weights = align(labels, weights, shift=shift, ignore_index=ignore_index, dtype=torch.float64)
    if classes is not None:
        item_weights = item_weights * target_class_weights(classes, targets)
    if normalize == "sequence":
        count = (item_weights.sum(dim=-1) > 0).sum()
    else:
        count = item_weights.sum()
    count = count.to(dtype)
    if group is not None:
        count = _all_reduce_sum(count, group)
    return count


def _policy_count(mask: object, loss_type: str) -> torch.Tensor:
    """Scored tokens or sequences of a ``[B, T]`` completion mask (``int64``)."""
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"with loss_type={loss_type!r}, pass the policy loss's [B, T] mask; got {shape}")
    if loss_type in SEQUENCE_LOSS_TYPES:
        # The sequence-normalized types average over every row, empty ones included (as TRL does).
        return torch.tensor(mask.shape[0], dtype=torch.int64, device=mask.device)
    return (mask != 0).sum().to(torch.int64)


def _all_reduce_sum(value: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum over ``group``; NCCL only reduces CUDA tensors, and labels often live on CPU."""
    if value.device.type == "cpu" and dist.get_backend(group) == "nccl":
        reduced = value.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
        return reduced.to(value.device)
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


@dataclass(frozen=True)
class MicroBatch(Generic[BatchT]):
    """One micro-batch of an optimizer step, with what its loss needs.

    Attributes:
        batch: the micro-batch as given.
        num_items_in_batch: 0-dim tensor, the items of the whole step (every
            micro-batch, summed over ``group``): pass it to the loss.
        loss_scale: multiply the loss by this before ``backward()``: the world size
            of ``group`` when gradients are averaged over ranks (DDP, FSDP), else 1.
        index: position of this micro-batch in the step.
        is_last: ``True`` for the last micro-batch (e.g. leave ``ddp.no_sync()`` there).
    """

    batch: BatchT
    num_items_in_batch: torch.Tensor
    loss_scale: float
    index: int
    is_last: bool


def micro_batches(
    batches: Iterable[BatchT],
    *,
    shift: bool = True,
    ignore_index: int = -100,
    normalize: Normalize = "token",
    labels_key: str = "labels",
    weights_key: str | None = None,
    group: dist.ProcessGroup | None = None,
    gradients_averaged: bool = True,
    loss_type: str | None = None,
) -> Iterator[MicroBatch[BatchT]]:
    """Yield the micro-batches of one optimizer step with the step's item count.

    The count of the whole step is needed before the first backward, so the
    micro-batches are read (not copied) up front; pass only one step's worth.

    Args:
        batches: the micro-batches of one optimizer step: mappings holding
            ``labels_key`` (``[..., T]`` labels), or the labels tensors themselves.
        shift, ignore_index, normalize: as given to the loss.
        labels_key: key of the labels in each mapping.
        weights_key: key of ``token_weights`` in each mapping, if the loss uses them.
        group: process group to sum counts over (data parallelism); every rank must
            iterate the same number of steps (it is a collective).
        gradients_averaged: ``True`` (DDP, FSDP) makes ``loss_scale`` the world size
            of ``group``, undoing the average; ``False`` if gradients are summed.
        loss_type: count for :func:`lmloss.rl.policy_loss` of this loss type (see
            :func:`count_targets`); ``labels_key`` then names the completion mask.

    Yields:
        ``MicroBatch`` items in the order given.
    """
    step = list(batches)
    if not step:
        raise ValueError("micro_batches() got no micro-batch: pass the micro-batches of one optimizer step")
    counts = [
        count_targets(
            _get(batch, labels_key, "labels"),
            shift=shift,
            ignore_index=ignore_index,
            token_weights=None if weights_key is None else _get(batch, weights_key, "weights"),
            normalize=normalize,
            loss_type=loss_type,
        )
        for batch in step
    ]
    total = torch.stack([c.to(counts[0].device, torch.float64) for c in counts]).sum().to(counts[0].dtype)
    if group is not None:
        total = _all_reduce_sum(total, group)
    scale = float(dist.get_world_size(group)) if group is not None and gradients_averaged else 1.0
    for index, batch in enumerate(step):
        yield MicroBatch(batch, total, scale, index, index == len(step) - 1)


def _get(batch: Any, key: str, what: str) -> torch.Tensor:
    if isinstance(batch, torch.Tensor) and what == "labels":
        return batch
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"each micro-batch must be a mapping with {key!r} or a labels tensor, got {type(batch).__name__}"
        )
    if key not in batch:
        raise ValueError(f"micro-batch has no {key!r} entry (keys: {sorted(batch)}); set {what}_key=")
    return batch[key]
