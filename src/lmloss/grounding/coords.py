"""Coordinate spaces of boxes: normalized ``[0, 1]``, grid (Qwen2-VL's 0-1000), pixels and bins."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lmloss._validation import check_choice
from lmloss.grounding._common import (
    QWEN2_VL_GRID,
    SPACES,
    Space,
    check_image_size,
    check_num_bins,
)

__all__ = ["convert_boxes"]


def convert_boxes(
    boxes: torch.Tensor | Sequence[Sequence[float]],
    *,
    src: Space,
    dst: Space,
    image_size: tuple[int, int] | None = None,
    grid_size: int = QWEN2_VL_GRID,
    num_bins: int | None = None,
) -> Any:
    """Move xyxy boxes between coordinate spaces.

    Spaces: ``"normalized"`` (``[0, 1]`` of the image), ``"grid"`` (``[0, grid_size]``,
    Qwen2-VL's 0-1000), ``"pixels"`` (needs ``image_size=(width, height)``) and
    ``"bins"`` (bin indices of ``num_bins`` equal bins; bin ``k`` covers
    ``[k/n, (k+1)/n)`` and reads back as its centre ``(k + 0.5)/n``).

    Args:
        boxes: ``[..., 4]`` tensor, or a sequence of 4-sequences.

    Returns:
        The same kind as ``boxes`` (a tensor of the same shape, or a list of
        tuples). Results are not rounded, except into ``"bins"`` (bin indices are
        integers: ``floor(x * n)`` clamped to ``[0, n-1]``).
    """
    check_choice("src", src, SPACES)
    check_choice("dst", dst, SPACES)
    as_list = not isinstance(boxes, torch.Tensor)
    tensor = boxes if isinstance(boxes, torch.Tensor) else torch.as_tensor(boxes, dtype=torch.float64)
    if tensor.ndim == 0 or tensor.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [..., 4], got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    normalized = _to_normalized(tensor, src, image_size, grid_size, num_bins)
    out = _from_normalized(normalized, dst, image_size, grid_size, num_bins)
    return [tuple(float(v) for v in row) for row in out.reshape(-1, 4).tolist()] if as_list else out


def _scale(tensor: torch.Tensor, space: str, image_size: object, grid_size: int) -> torch.Tensor:
    if space == "normalized":
        return tensor.new_ones(4)
    if space == "grid":
        if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 1:
            raise ValueError(f"grid_size must be an int >= 1, got {grid_size!r}")
        return tensor.new_full((4,), float(grid_size))
    width, height = check_image_size(image_size, required=True)
    return tensor.new_tensor([width, height, width, height])


def _to_normalized(tensor: torch.Tensor, src: str, image_size: object, grid_size: int, num_bins: object):
    if src == "bins":
        return (tensor + 0.5) / check_num_bins(num_bins)
    return tensor / _scale(tensor, src, image_size, grid_size)


def _from_normalized(tensor: torch.Tensor, dst: str, image_size: object, grid_size: int, num_bins: object):
    if dst == "bins":
        n = check_num_bins(num_bins)
        return torch.floor(tensor * n).clamp(0, n - 1)
    return tensor * _scale(tensor, dst, image_size, grid_size)
