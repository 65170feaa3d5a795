"""Box geometry: IoU, GIoU and L1 of xyxy boxes, elementwise over ``[..., 4]``.

Computed in float32 (float64 stays float64) whatever the input dtype, and finite,
with finite gradients, for degenerate boxes (zero width or height, reversed
corners, identical points) and for coordinates up to the input dtype's range:

- float16/bfloat16 input is upcast, and the gradient cast back to it is clamped to
  the dtype's finite range (a zero-width box has a gradient of ``1/eps`` = 1e7 in
  float32, beyond float16's 65504);
- coordinates are divided by a power of two (exact) when they exceed 2**32, so
  that areas (squares of coordinates) cannot overflow: 1e30 gives GIoU, not
  ``inf - inf``. IoU and GIoU are ratios of areas, so the scale cancels.
"""

from __future__ import annotations

import math
import numbers

import torch

from lmloss._validation import check_choice, check_tensor
from lmloss.grounding._common import Reduction

__all__ = ["DEFAULT_EPS", "box_iou", "giou", "giou_loss", "l1_box_loss"]

# Added to the union and the enclosing area: turns the 0/0 of zero-area boxes into 0
# (the IoU of empty boxes is 0) and keeps gradients finite. torchvision's value; it
# is negligible against any box larger than ~1e-3 of the image side in normalized
# units (area 1e-6); pass a smaller eps for smaller boxes.
DEFAULT_EPS = 1e-7
# Coordinates up to 2**32 keep every area below 2**66, far inside float32's range;
# beyond it, boxes are scaled down by a power of two (which rounds nothing).
_LARGEST_UNSCALED_EXPONENT = 32


class _FiniteUpcast(torch.autograd.Function):
    """``x.to(dtype)`` whose backward clamps the gradient into ``x.dtype``'s finite range."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.source = x.dtype
        return x.to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        largest = torch.finfo(ctx.source).max
        return grad.clamp(-largest, largest).to(ctx.source), None


def _upcast(box: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if box.dtype == dtype:
        return box
    if box.requires_grad and torch.finfo(box.dtype).max < torch.finfo(dtype).max:
        return _FiniteUpcast.apply(box, dtype)
    return box.to(dtype)


def _box_pair(pred: object, target: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Both boxes in the compute dtype (float64 stays float64, else float32), broadcast."""
    pred, target = check_tensor("pred", pred), check_tensor("target", target)
    for name, t in (("pred", pred), ("target", target)):
        if t.ndim == 0 or t.shape[-1] != 4:
            raise ValueError(f"{name} must have shape [..., 4] (x1, y1, x2, y2), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    try:
        shape = torch.broadcast_shapes(pred.shape, target.shape)
    except RuntimeError:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} boxes must have broadcastable shapes"
        ) from None
    dtype = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    return _upcast(pred, dtype).expand(shape), _upcast(target, dtype).expand(shape)


def _rescaled(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both boxes divided by ``2**k`` (per pair), ``k`` such that no coordinate exceeds 2**32.

    A power of two divides exactly, so pairs within the range are left bit for bit
    as they are; the scale is a constant (no gradient flows into it).
    """
    with torch.no_grad():
        largest = torch.maximum(pred.abs().amax(-1), target.abs().amax(-1))
        _, exponent = torch.frexp(largest)  # largest <= 2**exponent
        shift = (exponent - _LARGEST_UNSCALED_EXPONENT).clamp_min(0)
        scale = torch.ldexp(torch.ones_like(largest), shift).unsqueeze(-1)
    return pred / scale, target / scale


def _area(box: torch.Tensor) -> torch.Tensor:
    # A reversed box (x2 < x1) has no area: clamping keeps union >= intersection >= 0,
    # so early-training predictions with crossed corners cannot make IoU negative.
    return (box[..., 2] - box[..., 0]).clamp_min(0) * (box[..., 3] - box[..., 1]).clamp_min(0)


def _overlap(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas, ``[...]``."""
    low = torch.maximum(pred[..., :2], target[..., :2])
    high = torch.minimum(pred[..., 2:], target[..., 2:])
    side = (high - low).clamp_min(0)
    inter = side[..., 0] * side[..., 1]
    return inter, _area(pred) + _area(target) - inter


def box_iou(pred: torch.Tensor, target: torch.Tensor, *, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Elementwise intersection over union of xyxy boxes.

    Unlike ``torchvision.ops.box_iou`` (all pairs), box ``i`` of ``pred`` is compared
    with box ``i`` of ``target``.

    Args:
        pred: ``[..., 4]`` boxes (x1, y1, x2, y2), any float dtype, finite.
        target: ``[..., 4]`` boxes, broadcastable with ``pred``.
        eps: added to the union: zero-area boxes get IoU 0 (not 0/0) and a finite
            gradient. Reversed boxes (x2 < x1) count as empty.

    Returns:
        ``[...]`` IoU in ``[0, 1]``, float32 (float64 for float64 input).
    """
    pred, target = _rescaled(*_box_pair(pred, target))
    inter, union = _overlap(pred, target)
    return inter / (union + eps)


def giou(pred: torch.Tensor, target: torch.Tensor, *, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Elementwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes.

    ``GIoU = IoU - (C - U) / C`` with ``C`` the area of the smallest box enclosing
    both and ``U`` their union. Unlike IoU it keeps a gradient for disjoint boxes
    (it falls towards -1 as they move apart).

    Args:
        pred, target: ``[..., 4]`` boxes (broadcastable), any float dtype, finite.
        eps: added to the union and to ``C`` (see :func:`box_iou`): two identical
            points give 0, not 0/0.

    Returns:
        ``[...]`` values in ``[-1, 1]``, float32 (float64 for float64 input).
    """
    pred, target = _rescaled(*_box_pair(pred, target))
    inter, union = _overlap(pred, target)
    low = torch.minimum(pred[..., :2], target[..., :2])
    high = torch.maximum(pred[..., 2:], target[..., 2:])
    side = (high - low).clamp_min(0)
    enclosing = side[..., 0] * side[..., 1]
    return inter / (union + eps) - (enclosing - union) / (enclosing + eps)


def l1_box_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: Reduction = "mean",
    num_boxes: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """L1 distance of boxes: the sum over the 4 coordinates of ``|pred - target|``.

    As in DETR, each box contributes the sum of its 4 coordinate errors and
    ``"mean"`` divides by the number of boxes (not of coordinates).

    Args:
        pred, target: ``[..., 4]`` boxes (broadcastable), any float dtype.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[...]`` per box).
        num_boxes: the divisor of ``"mean"`` (e.g. the boxes of the whole optimizer
            step, across micro-batches); default: the boxes given here.

    Returns:
        float32 (float64 for float64 input); an attached 0 when there is no box.
    """
    pred, target = _box_pair(pred, target)
    return _reduce((pred - target).abs().sum(-1), reduction, num_boxes)


def giou_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: Reduction = "mean",
    num_boxes: int | float | torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """``1 - giou(pred, target)`` per box, in ``[0, 2]``; options as in :func:`l1_box_loss`."""
    return _reduce(1.0 - giou(pred, target, eps=eps), reduction, num_boxes)


def _reduce(per_box: torch.Tensor, reduction: object, num_boxes: object) -> torch.Tensor:
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    if reduction == "none":
        return per_box
    total = per_box.sum()
    if reduction == "sum":
        return total
    divisor = _num_boxes(num_boxes, per_box.numel(), total)
    # where() on the divisor keeps the no-box case an exact, attached 0 (never 0/0).
    return total / torch.where(divisor > 0, divisor, torch.ones_like(divisor))


def _num_boxes(num_boxes: object, default: int, like: torch.Tensor) -> torch.Tensor:
    if num_boxes is None:
        return like.new_tensor(float(default))
    if isinstance(num_boxes, torch.Tensor):
        if num_boxes.numel() != 1:
            raise ValueError(f"num_boxes must hold one number, got shape {tuple(num_boxes.shape)}")
        return num_boxes.detach().reshape(()).to(like)
    if isinstance(num_boxes, bool) or not isinstance(num_boxes, numbers.Real):
        raise ValueError(f"num_boxes must be a number or a tensor, got {type(num_boxes).__name__}")
    if not math.isfinite(num_boxes) or num_boxes < 0:
        raise ValueError(f"num_boxes must be finite and >= 0, got {num_boxes}")
    return like.new_tensor(float(num_boxes))
