"""Argument checks shared by every public function.

Checks that only look at shapes, dtypes and Python values are always on. Checks
that must read tensor *values* (label range, finiteness of a tensor count, weight
signs) cost a host-device synchronisation on a GPU, so they can be switched off,
e.g. for CUDA-graph capture or ``torch.compile``::

    with lmloss.validation(False):
        loss = lmloss.causal_lm_loss(logits, labels)

With value checks off, bad values give undefined results instead of an error.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
from collections.abc import Iterator

import torch

REDUCTIONS = ("mean", "sum", "none")
NORMALIZATIONS = ("token", "sequence")
# Per-token loss forms: plain cross-entropy, DFT (CE times the detached target
# probability) and focal weighting (CE times (1 - p)^gamma, detached or not).
TOKEN_LOSSES = ("ce", "dft", "focal", "focal_attached")
DEFAULT_FOCAL_GAMMA = 2.0

_state = threading.local()


def value_checks_enabled() -> bool:
    """Whether checks that read tensor values (and so synchronise) are on."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def validation(enabled: bool = True) -> Iterator[None]:
    """Context manager that turns value checks on or off in this thread.

    Args:
        enabled: ``False`` skips every check that reads tensor values (label range,
            weight signs, finiteness of a tensor ``num_items_in_batch``), so that no
            host-device synchronisation happens. Shape, dtype and option checks stay.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"validation(enabled=...) takes a bool, got {type(enabled).__name__}")
    previous = value_checks_enabled()
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = previous


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(map(repr, choices))}")


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_labels(labels: object, expected_shape: torch.Size | None = None) -> torch.Tensor:
    """``labels`` must be an integer tensor (not bool) of ``expected_shape`` if given.

    Returns them as int64 unless they are int32 or int64 already (uint8 labels
    could not even hold ``ignore_index=-100``).
    """
    labels = check_tensor("labels", labels)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"labels must be an integer tensor of token ids (e.g. torch.long), got dtype {labels.dtype}"
        )
    if expected_shape is not None and labels.shape != expected_shape:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but must match the leading dimensions "
            f"of the input, {tuple(expected_shape)}"
        )
    return labels if labels.dtype in (torch.int32, torch.int64) else labels.long()


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise if a label is neither ``ignore_index`` nor a token id in ``[0, vocab_size)``.

    Reads tensor values, so it is skipped when value checks are off.
    """
    if not value_checks_enabled() or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        value = int(labels[position])
        count = int(bad.sum())
        raise ValueError(
            f"labels{list(position)} = {value} is outside the vocabulary [0, {vocab_size}) and is not "
            f"ignore_index={ignore_index} ({count} such label(s) in all); mask targets with "
            f"ignore_index or check that the labels belong to this model's vocabulary"
        )


def check_token_weights(token_weights: object, labels: torch.Tensor) -> torch.Tensor:
    """Token weights (or a 0/1/bool loss mask) aligned with ``labels``; returns float32 weights."""
    weights = check_tensor("token_weights", token_weights)
    if weights.shape != labels.shape:
        raise ValueError(
            f"token_weights has shape {tuple(weights.shape)} but must have the shape of labels, "
            f"{tuple(labels.shape)}: weights are aligned with labels and shifted with them"
        )
    if weights.is_complex():
        raise ValueError(f"token_weights must be real (float, int or bool), got dtype {weights.dtype}")
    if weights.device != labels.device:
        raise ValueError(f"token_weights is on {weights.device} but labels are on {labels.device}")
    # Detached: weights are constants of the loss (no backend propagates into them).
    weights = weights.detach().to(torch.float64 if weights.dtype == torch.float64 else torch.float32)
    if value_checks_enabled() and weights.numel() and not bool(((weights >= 0) & weights.isfinite()).all()):
        raise ValueError("token_weights must be finite and non-negative (a weight of 0 masks the token)")
    return weights


def check_num_items(num_items_in_batch: object) -> torch.Tensor | float | None:
    """``num_items_in_batch``: None, a non-negative finite number, or a one-element tensor."""
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must hold one number, got a tensor of shape {tuple(num_items_in_batch.shape)}"
            )
        if num_items_in_batch.is_complex() or num_items_in_batch.dtype == torch.bool:
            raise ValueError(f"num_items_in_batch must be a real number, got dtype {num_items_in_batch.dtype}")
        if value_checks_enabled():
            value = float(num_items_in_batch)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"num_items_in_batch must be finite and >= 0, got {value}")
        return num_items_in_batch.reshape(())
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        raise TypeError(f"num_items_in_batch must be a number or a tensor, got {type(num_items_in_batch).__name__}")
    if not math.isfinite(num_items_in_batch) or num_items_in_batch < 0:
        raise ValueError(f"num_items_in_batch must be finite and >= 0, got {num_items_in_batch}")
    return float(num_items_in_batch)  # also numpy scalars


def check_loss_options(
    *,
    shift: object = True,
    ignore_index: object,
    reduction: object,
    label_smoothing: object,
    z_loss: object,
    softcap: object,
    normalize: object,
    token_loss: object = "ce",
    focal_gamma: object = None,
) -> None:
    """Options shared by ``causal_lm_loss`` and the fused backends."""
    check_bool("shift", shift)
    check_int("ignore_index", ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("normalize", normalize, NORMALIZATIONS)
    _check_real("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:  # type: ignore[operator]
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    _check_real("z_loss", z_loss)
    if not (math.isfinite(z_loss) and z_loss >= 0.0):  # type: ignore[arg-type, operator]
        raise ValueError(f"z_loss must be a finite coefficient >= 0, got {z_loss}")
    if softcap is not None:
        _check_real("softcap", softcap)
        if not (math.isfinite(softcap) and softcap > 0.0):  # type: ignore[arg-type, operator]
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    resolve_focal_gamma(token_loss, focal_gamma)


def resolve_focal_gamma(token_loss: object, focal_gamma: object) -> float:
    """Check ``token_loss`` and ``focal_gamma`` together; returns the gamma to use.

    ``focal_gamma`` belongs to the focal forms only: given with any other
    ``token_loss`` it would silently do nothing, so it is refused. ``None`` means
    ``DEFAULT_FOCAL_GAMMA`` for the focal forms (0.0, unused, for the others).
    """
    check_choice("token_loss", token_loss, TOKEN_LOSSES)
    focal = token_loss in ("focal", "focal_attached")
    if focal_gamma is None:
        return DEFAULT_FOCAL_GAMMA if focal else 0.0
    if not focal:
        raise ValueError(
            f"focal_gamma={focal_gamma!r} is only used with token_loss='focal' or 'focal_attached', "
            f"but token_loss={token_loss!r}; leave focal_gamma=None"
        )
    _check_real("focal_gamma", focal_gamma)
    if not (math.isfinite(focal_gamma) and focal_gamma >= 0.0):  # type: ignore[arg-type, operator]
        raise ValueError(f"focal_gamma must be a finite number >= 0, got {focal_gamma}")
    return float(focal_gamma)  # type: ignore[arg-type]


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
