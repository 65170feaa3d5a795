"""Target planning: what every backend needs to know about the targets, per position.

With ``shift=True`` the targets of positions ``0..T-1`` are ``labels[..., 1:]``
followed by ``ignore_index`` (the last position scores nothing); token weights are
shifted the same way. ``normalize="sequence"`` is folded into one coefficient per
position (a row's weights divided by their sum), so a backend only ever sums
``coef * loss``. The reference (``lmloss.reference``) and every backend plan alike.

Class weights (``class_weights``, torch's ``weight``) are not folded into ``coef``:
with label smoothing a target whose class weight is 0 still has a loss (the smoothing
term weighs every class), so the row math applies them. They enter the *count*: an
item is worth ``token weight * class_weights[target]``, as torch's mean divides by
the sum of the targets' class weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmloss._spec import LossSpec, Normalize
from lmloss._validation import (
    check_class_weights,
    check_ignore_index,
    check_label_range,
    check_num_items,
    check_token_weights,
    value_checks_enabled,
)

__all__ = [
    "TargetPlan",
    "align",
    "target_class_weights",
    "plan_targets",
    "prepare",
    "finish",
    "to_label_alignment",
    "mean_over_items",
    "compute_dtype",
]


@dataclass(frozen=True)
class TargetPlan:
    """What every backend needs to know about the targets, per *position*.

    Attributes:
        targets: ``[..., T]`` the target of each position (``ignore_index`` where none).
        coef: ``[..., T]`` the factor of each position's loss in the sum: its token
            weight (1 for a plain loss), divided by its row's weight sum under
            ``normalize="sequence"``; exactly 0 where nothing is scored.
        item_count: 0-dim, the default divisor of ``"mean"`` (target tokens, weight
            sum, or rows with a target; each target counted times its class weight).
        class_weights: ``[V]`` class weights in the compute dtype, or None.
    """

    targets: torch.Tensor
    coef: torch.Tensor
    item_count: torch.Tensor
    class_weights: torch.Tensor | None = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the loss math: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def align(
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    shift: bool,
    ignore_index: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and item weights per *position* (``[..., T]``), 0 weight where unscored."""
    check_ignore_index(labels, ignore_index)
    if shift and labels.shape[-1] > 0:
        # Pad-then-slice keeps [..., T] so the logits need no (copying) slice.
        targets = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
        if weights is not None:
            weights = F.pad(weights[..., 1:], (0, 1), value=0.0)
    else:
        targets = labels
    valid = targets != ignore_index
    item_weights = valid.to(dtype) if weights is None else weights.to(dtype) * valid
    return targets, item_weights


def plan_targets(
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    shift: bool,
    ignore_index: int,
    normalize: Normalize,
    dtype: torch.dtype,
    class_weights: torch.Tensor | None = None,
) -> TargetPlan:
    """Align targets and weights with positions and fold the normalization into ``coef``.

    ``class_weights``: ``[V]`` checked class weights (``dtype``), or None.
    """
    targets, item_weights = align(labels, weights, shift=shift, ignore_index=ignore_index, dtype=dtype)
    counted = item_weights if class_weights is None else item_weights * target_class_weights(class_weights, targets)
    if normalize == "sequence":
        # A row is averaged over its own counted weight; a row whose targets all weigh 0
        # has nothing to divide by and is skipped (never 0/0).
        row_weight = counted.sum(dim=-1, keepdim=True)
        has_target = row_weight > 0
        safe = torch.where(has_target, row_weight, torch.ones_like(row_weight))
        coef = torch.where(has_target, item_weights / safe, torch.zeros_like(item_weights))
        item_count = has_target.sum().to(item_weights.dtype)
    else:
        coef, item_count = item_weights, counted.sum()
    return TargetPlan(targets, coef, item_count, class_weights)


def target_class_weights(class_weights: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``class_weights[targets]`` (``targets``' shape); any value where a target is ``ignore_index``
    (the caller weighs those by 0). The clamp keeps the gather in range for any ignore_index."""
    return class_weights[targets.clamp(0, class_weights.shape[0] - 1)]


def prepare(
    labels: torch.Tensor,
    token_weights: object,
    num_items_in_batch: object,
    vocab_size: int,
    spec: LossSpec,
    dtype: torch.dtype,
    class_weights: object = None,
) -> tuple[TargetPlan, torch.Tensor | float | None]:
    """The per-call checks every backend makes (label range, weights, count), then the plan."""
    check_label_range(labels, vocab_size, spec.ignore_index)
    weights = None if token_weights is None else check_token_weights(token_weights, labels)
    classes = None if class_weights is None else check_class_weights(class_weights, vocab_size, labels.device, dtype)
    num_items = check_num_items(num_items_in_batch)
    plan = plan_targets(
        labels,
        weights,
        shift=spec.shift,
        ignore_index=spec.ignore_index,
        normalize=spec.normalize,
        dtype=dtype,
        class_weights=classes,
    )
    return plan, num_items


def finish(
    result: torch.Tensor,
    plan: TargetPlan,
    labels_shape: torch.Size,
    spec: LossSpec,
    num_items: torch.Tensor | float | None,
) -> torch.Tensor:
    """Per-position weighted losses (``[N]``) or their sum (0-dim) -> the reduction asked for."""
    if spec.reduction == "none":
        return to_label_alignment(result.view(labels_shape), spec.shift)
    total = result if result.ndim == 0 else result.sum()
    return total if spec.reduction == "sum" else mean_over_items(total, plan.item_count, num_items)


def to_label_alignment(per_position: torch.Tensor, shift: bool) -> torch.Tensor:
    """``reduction="none"`` output: the loss of target ``labels[t]`` sits at ``t``."""
    if not shift or per_position.shape[-1] == 0:
        return per_position
    return F.pad(per_position[..., :-1], (1, 0))


def mean_over_items(
    total: torch.Tensor, item_count: torch.Tensor, num_items: torch.Tensor | float | None
) -> torch.Tensor:
    """``total / num_items_in_batch`` (or ``/ item_count``), an exact 0 when the divisor is 0.

    A zero divisor with a nonzero total happens only with class weights and label
    smoothing (every target's class weight 0, the smoothing term still > 0): torch
    gives NaN there; lmloss gives 0 with zero gradients, as for an all-masked batch.
    """
    divisor = item_count if num_items is None else _as_divisor(num_items, item_count)
    # where() on the divisor (not on the quotient) keeps the all-masked gradient 0, not NaN.
    has_items = divisor > 0
    quotient = total / torch.where(has_items, divisor, torch.ones_like(divisor))
    return torch.where(has_items, quotient, torch.zeros_like(quotient))


def _as_divisor(num_items: torch.Tensor | float, item_count: torch.Tensor) -> torch.Tensor:
    divisor = torch.as_tensor(num_items, dtype=item_count.dtype, device=item_count.device)
    if value_checks_enabled() and bool(divisor == 0) and bool(item_count > 0):
        raise ValueError(
            f"num_items_in_batch is 0 but this batch has {float(item_count):g} target item(s): it must count "
            "every target of the step (see lmloss.count_targets)"
        )
    return divisor
