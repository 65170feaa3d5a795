"""Token ids that are never targets: a config's placeholders, checked id lists, masking."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lmloss._validation import check_int

__all__ = ["PLACEHOLDER_CONFIG_KEYS", "check_token_ids", "mask_token_ids", "placeholder_token_ids", "token_hits"]

# Config attributes naming placeholder tokens (image/video/audio features are spliced in
# at these positions, so they are inputs, never targets).
PLACEHOLDER_CONFIG_KEYS = (
    "image_token_id",
    "video_token_id",
    "audio_token_id",
    "image_token_index",
    "video_token_index",
    "audio_token_index",
)


def placeholder_token_ids(model_or_config: Any) -> tuple[int, ...]:
    """The placeholder token ids (image/video/audio) a model's config names.

    Args:
        model_or_config: a transformers model (its ``.config`` is read) or config.

    Returns:
        The sorted distinct non-negative ids of ``PLACEHOLDER_CONFIG_KEYS`` found on the
        config (e.g. Qwen2-VL: ``(151655, 151656)``); ``()`` for text-only models.
    """
    config = getattr(model_or_config, "config", model_or_config)
    found = set()
    for key in PLACEHOLDER_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            found.add(value)
    return tuple(sorted(found))


def check_token_ids(ids: Iterable[int]) -> tuple[int, ...]:
    """``ignore_token_ids`` checked: the sorted distinct ids.

    Raises:
        ValueError: ``ids`` is not an iterable of ints (a string is not) or holds a negative id.
        TypeError: an item is not an int.
    """
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ValueError(f"ignore_token_ids must be an iterable of token ids, got {ids!r}")
    checked = []
    for i in ids:
        if check_int("ignore_token_ids item", i) < 0:
            raise ValueError(f"ignore_token_ids must be token ids >= 0, got {i}")
        checked.append(i)
    return tuple(sorted(set(checked)))


def token_hits(labels: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor | None:
    """Where ``labels`` (``[..., T]``) holds one of ``ids`` (``[..., T]`` bool), or None without ids."""
    if not ids:
        return None
    return torch.isin(labels, torch.tensor(ids, device=labels.device, dtype=labels.dtype))


def mask_token_ids(labels: torch.Tensor, ids: tuple[int, ...], ignore_index: int) -> torch.Tensor:
    """``labels`` (``[..., T]``) with each of ``ids`` replaced by ``ignore_index``."""
    hit = token_hits(labels, ids)
    return labels if hit is None else labels.masked_fill(hit, ignore_index)
