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
from collections.abc import Iterable, Iterator, Mapping
from typing import cast

import torch

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


def check_keywords(
    where: str, given: Iterable[str], known: Iterable[str], fixed: Mapping[str, str] | None = None
) -> None:
    """Every keyword in ``given`` is one ``where`` takes (``known``); raises ``TypeError`` naming
    the first unknown one, with the reason when it is one of ``fixed`` (name -> why it is fixed)."""
    known = tuple(known)
    for name in given:
        if name in known:
            continue
        if fixed and name in fixed:
            raise TypeError(f"{where}() does not take {name}: {fixed[name]}")
        raise TypeError(f"{where}() got an unexpected keyword argument {name!r}; its options are {', '.join(known)}")


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_logits(logits: object, name: str = "logits") -> torch.Tensor:
    """A floating-point ``[..., T, V]`` tensor with a vocabulary of at least one."""
    logits = check_tensor(name, logits)
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.ndim < 2:
        raise ValueError(f"{name} must have shape [..., T, V] (at least 2-D), got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} have a vocabulary dimension of size 0")
    return logits


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
        raise ValueError(f"labels must be an integer tensor of token ids (e.g. torch.long), got dtype {labels.dtype}")
    if expected_shape is not None and labels.shape != expected_shape:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but must match the leading dimensions "
            f"of the input, {tuple(expected_shape)}"
        )
    return labels if labels.dtype in (torch.int32, torch.int64) else labels.long()


def check_labels_on(
    labels: object, expected_shape: torch.Size, device: torch.device, scores: str = "the scores"
) -> torch.Tensor:
    """:func:`check_labels`, and on ``device``: the device of the ``scores`` (logits or hidden
    states, named in the message) whose leading dimensions ``expected_shape`` they label."""
    labels = check_labels(labels, expected_shape)
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device}, {scores} on {device}: they must be on one device")
    return labels


def check_ignore_index(labels: torch.Tensor, ignore_index: int) -> None:
    """``ignore_index`` must be a value of the labels' dtype: compared with int32 labels,
    ``2**32 - 1`` would wrap around to ``-1`` and ignore the wrong label."""
    info = torch.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(
            f"ignore_index={ignore_index} does not fit the labels' dtype {labels.dtype} "
            f"([{info.min}, {info.max}]); use a value in that range (e.g. -100) or wider labels"
        )


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise if a label is neither ``ignore_index`` nor a token id in ``[0, vocab_size)``.

    The range of ``ignore_index`` is always checked; the labels' values are read only
    when value checks are on.
    """
    check_ignore_index(labels, ignore_index)
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


def check_class_weights(
    class_weights: object,
    vocab_size: int | None,
    device: torch.device | None,
    dtype: torch.dtype,
    name: str = "class_weights",
) -> torch.Tensor:
    """``class_weights``: a ``[V]`` floating-point tensor of finite, non-negative weights
    (``weight`` of ``torch.nn.functional.cross_entropy``); returns it detached, in ``dtype``.

    ``vocab_size``/``device``: what it must match (None: not known yet, e.g. a module's
    constructor); ``name``: the argument's name in the messages. Negative weights are
    refused although torch accepts them: the "mean" would divide by a sum that can be
    0 or negative.
    """
    weights = check_tensor(name, class_weights)
    if weights.ndim != 1 or (vocab_size is not None and weights.shape[0] != vocab_size):
        want = "[V]" if vocab_size is None else f"[V] = [{vocab_size}]"
        raise ValueError(
            f"{name} must have shape {want} (one weight per vocabulary entry, as weight= in "
            f"torch.nn.functional.cross_entropy), got shape {tuple(weights.shape)}"
        )
    if not weights.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {weights.dtype}")
    if device is not None and weights.device != device:
        raise ValueError(f"{name} is on {weights.device} but labels are on {device}")
    # Detached: the weights are constants of the loss (torch gives them no gradient either).
    weights = weights.detach().to(dtype)
    if value_checks_enabled() and weights.numel():
        bad = ~((weights >= 0) & weights.isfinite())
        if bool(bad.any()):
            index = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name} must be finite and non-negative, got {name}[{index}] = {float(weights[index])}")
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


def check_real(name: str, value: object) -> float:
    """``value`` is a real number (not a bool); returns it unchanged, typed for comparisons."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    # cast, not float(): the caller keeps the value as given (a huge int stays exact); any
    # numbers.Real compares and converts like a float, which typeshed's Real does not declare.
    return cast(float, value)


def check_finite(name: str, value: object) -> float:
    """``value`` is a finite real number (``TypeError`` otherwise, ``ValueError`` if not finite);
    returns it as a float."""
    number = check_real(name, value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(number)


def check_positive(name: str, value: object) -> float:
    """``value`` is a finite real number ``> 0``; returns it as a float."""
    number = check_finite(name, value)
    if number <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return number


def check_temperature(temperature: object) -> None:
    """``temperature``: a finite number ``> 0``, the divisor of the logits in ``softmax(z / tau)``."""
    temperature = check_real("temperature", temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
