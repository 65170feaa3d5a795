"""What every weighting strategy checks and computes on the named loss terms.

``Losses`` maps term names to 0-dim loss tensors; the strategies in ``weighting.py``
and ``gradnorm.py`` validate the names against those they were built for and add
the terms up in a common dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

__all__ = ["Losses", "check_known", "check_names", "check_same_terms", "math_dtype", "weighted_sum"]

Losses = Mapping[str, torch.Tensor]


# --- helpers --------------------------------------------------------------------------


def check_names(names: object) -> tuple[str, ...]:
    """The term names as a tuple: non-empty, unique strings (``ValueError`` otherwise)."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise ValueError(f"names must be a list of term names, got {names!r}")
    names = tuple(names)
    if not names:
        raise ValueError("names must name at least one term")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"term names must be non-empty strings, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"term names must be unique, got {list(names)}")
    return names


def check_same_terms(strategy: str, expected: Sequence[str], names: Iterable[str]) -> None:
    """Refuse a composite whose term names differ from those ``strategy`` was built for."""
    names = list(names)
    missing = [n for n in expected if n not in names]
    unknown = [n for n in names if n not in expected]
    if missing or unknown:
        raise ValueError(
            f"{strategy} was built for terms {list(expected)}, but the composite has {names} "
            f"(unknown: {unknown}, missing: {missing})"
        )


def check_known(strategy: str, expected: Sequence[str], losses: Losses) -> None:
    """Refuse loss terms ``strategy`` does not know."""
    unknown = [n for n in losses if n not in expected]
    if unknown:
        raise ValueError(f"{strategy} got unknown term name(s) {unknown}; it knows {list(expected)}")


def math_dtype(losses: Losses) -> torch.dtype:
    """float32 for low-precision terms; float64 stays float64."""
    dtype = torch.float32
    for loss in losses.values():
        dtype = torch.promote_types(dtype, loss.dtype)
    return dtype


def weighted_sum(losses: Losses, weights: Mapping[str, torch.Tensor | float]) -> torch.Tensor:
    """``sum_i weights[i] * losses[i]`` as a 0-dim tensor in :func:`math_dtype`."""
    dtype = math_dtype(losses)
    parts = [losses[name].to(dtype) * weights[name] for name in losses]
    return torch.stack(parts).sum()
