"""Masking placeholder token ids in labels that are already built."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, overload

import torch

from lmloss._validation import check_int
from lmloss.labels.options import check_token_id_set, preview

__all__ = ["mask_token_ids"]


@overload
def mask_token_ids(labels: torch.Tensor, token_ids: Iterable[int], ignore_index: int = -100) -> torch.Tensor: ...
@overload
def mask_token_ids(labels: list[int], token_ids: Iterable[int], ignore_index: int = -100) -> list[int]: ...
@overload
def mask_token_ids(labels: list[list[int]], token_ids: Iterable[int], ignore_index: int = -100) -> list[list[int]]: ...
def mask_token_ids(labels: Any, token_ids: Iterable[int], ignore_index: int = -100) -> Any:
    """Set ``labels`` to ``ignore_index`` wherever they hold one of ``token_ids``.

    For placeholder tokens that must never be targets, such as Qwen2-VL's
    ``<|image_pad|>``/``<|video_pad|>``: the model sees them in its input, but their
    "next token" is decided by the image, not predicted by the model.

    Args:
        labels: a ``[..., T]`` integer tensor, a ``list[int]`` or a list of such lists.
        token_ids: ids to mask.
        ignore_index: the value written in their place.

    Returns:
        A new object of the same kind (the input is not modified).
    """
    ids = check_token_id_set("token_ids", token_ids)
    check_int("ignore_index", ignore_index)
    if isinstance(labels, torch.Tensor):
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if not ids:
            return labels.clone()
        table = torch.tensor(sorted(ids), dtype=labels.dtype, device=labels.device)
        return labels.masked_fill(torch.isin(labels, table), ignore_index)
    if isinstance(labels, list):
        return _mask_list(labels, ids, ignore_index)
    raise TypeError(f"labels must be a torch.Tensor or a list of ints, got {type(labels).__name__}")


def _mask_list(labels: list[Any], ids: frozenset[int], ignore_index: int) -> list[Any]:
    out: list[Any] = []
    for label in labels:
        if isinstance(label, list):
            out.append(_mask_list(label, ids, ignore_index))
        elif isinstance(label, int) and not isinstance(label, bool):
            out.append(ignore_index if label in ids else label)
        else:
            raise TypeError(f"labels must hold ints (or lists of ints), got {preview(label)}")
    return out
