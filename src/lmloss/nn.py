"""Module forms of the losses, for code that builds its criterion once."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from lmloss._spec import (
    SPEC_OPTIONS,
    Backend,
    LossSpec,
    Normalize,
    Reduction,
    TokenLoss,
    check_loss_options,
)
from lmloss._validation import check_class_weights
from lmloss.fused import check_backend_options, linear_cross_entropy
from lmloss.reference import causal_lm_loss

__all__ = ["CausalLMLoss", "DistillationLoss", "LinearDistillationLoss", "LinearCrossEntropyLoss"]


class _LossModule(nn.Module):
    """Holds its options, checked together at construction and again whenever one is set.

    Options read and set as attributes (``module.reduction = "sum"``), like torch.nn
    losses; a bad value raises and leaves the module unchanged. The per-token options
    live in a :class:`~lmloss._spec.LossSpec` (``module.spec``); others (the backend,
    the chunk size, a distillation temperature) beside it.
    """

    _options: dict[str, object]
    spec: LossSpec

    def __init__(self, **options: object) -> None:
        super().__init__()
        self.__dict__["_options"] = {}
        self.__dict__["spec"] = self._checked(options)
        self.__dict__["_options"] = dict(options)

    def _checked(self, options: dict[str, object]) -> LossSpec:
        """Check ``options`` together; returns their spec."""
        return check_loss_options(**{k: options[k] for k in SPEC_OPTIONS if k in options})

    def __setattr__(self, name: str, value: object) -> None:
        options = self.__dict__.get("_options")
        if options is not None and name in options:
            updated = {**options, name: value}
            self.__dict__["spec"] = self._checked(updated)  # raises before anything changes
            options[name] = value
        else:
            super().__setattr__(name, value)  # type: ignore[arg-type]  # stub: Tensor | Module; any value works

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("_options", {})
        if name in options:
            return options[name]
        return super().__getattr__(name)

    @property
    def options(self) -> dict[str, object]:
        """A copy of every option, by name."""
        return dict(self._options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._options.items())


class CausalLMLoss(_LossModule):
    """``lmloss.causal_lm_loss`` as a module; options are fixed at construction.

    Args:
        weight: ``[V]`` class weights, under ``torch.nn.CrossEntropyLoss``'s name: the
            ``class_weights`` of :func:`lmloss.causal_lm_loss` (held as the buffer
            ``weight``, so it moves with ``.to()``; ``class_weights`` is the same tensor).
        class_weights: the same, under lmloss's name (give one of the two).
        shift, ignore_index, reduction, label_smoothing, z_loss, softcap, normalize,
        token_loss, focal_gamma: as in :func:`lmloss.causal_lm_loss`.
        size_average, reduce: PyTorch's deprecated arguments. When either is given
            they decide ``reduction`` exactly as in ``torch.nn.CrossEntropyLoss``
            (``reduce=False`` -> ``"none"``; else ``size_average=False`` -> ``"sum"``;
            else ``"mean"``) and a ``FutureWarning`` says which ``reduction`` to use.

    Shape:
        - logits: ``[..., T, V]``; labels: ``[..., T]``; token_weights: ``[..., T]``.
        - output: scalar, or ``[..., T]`` with ``reduction="none"``.
    """

    weight: torch.Tensor | None

    def __init__(
        self,
        *,
        weight: torch.Tensor | None = None,
        shift: bool = True,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        normalize: Normalize = "token",
        token_loss: TokenLoss = "ce",
        focal_gamma: float | None = None,
        class_weights: torch.Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
    ) -> None:
        if weight is not None and class_weights is not None:
            raise ValueError("give the class weights as weight= (torch's name) or class_weights=, not both")
        classes = (
            _checked_class_weights(weight, "weight") if weight is not None else _checked_class_weights(class_weights)
        )
        if size_average is not None or reduce is not None:
            reduction = _legacy_reduction(size_average, reduce)
        super().__init__(**_picked(locals(), SPEC_OPTIONS))
        self.register_buffer("weight", classes)

    @property
    def class_weights(self) -> torch.Tensor | None:
        """The ``[V]`` class weights (the buffer ``weight``), or None."""
        return self.weight

    @class_weights.setter
    def class_weights(self, value: torch.Tensor | None) -> None:
        self.weight = _checked_class_weights(value)

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        num_items_in_batch: torch.Tensor | int | float | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of ``logits [..., T, V]`` against ``labels [..., T]``."""
        return causal_lm_loss(
            logits,
            labels,
            num_items_in_batch=num_items_in_batch,
            token_weights=token_weights,
            class_weights=self.weight,
            **self.spec.options(),  # type: ignore[arg-type]  # options() values are object; LossSpec checked each
        )


class LinearCrossEntropyLoss(_LossModule):
    """``lmloss.linear_cross_entropy`` as a module: the loss from hidden states and
    the ``lm_head`` weight without ``[tokens, vocab]`` logits.

    Args:
        shift, ignore_index, reduction, label_smoothing, z_loss, softcap, normalize,
        token_loss, focal_gamma, backend, chunk_size: as in
            :func:`lmloss.linear_cross_entropy`.
        class_weights: ``[V]`` class weights (torch's ``weight``; not under that name
            here, where ``weight`` is the ``lm_head`` weight ``forward`` takes), held as
            the buffer ``class_weights``.

    Shape:
        - hidden: ``[..., T, D]``; weight: ``[V, D]``; bias: ``[V]``; labels and
          token_weights: ``[..., T]``.
        - output: scalar, or ``[..., T]`` with ``reduction="none"``.
    """

    class_weights: torch.Tensor | None

    def __init__(
        self,
        *,
        shift: bool = True,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        normalize: Normalize = "token",
        token_loss: TokenLoss = "ce",
        focal_gamma: float | None = None,
        class_weights: torch.Tensor | None = None,
        backend: Backend = "auto",
        chunk_size: int | None = None,
    ) -> None:
        classes = _checked_class_weights(class_weights)
        super().__init__(**_picked(locals(), (*SPEC_OPTIONS, "backend", "chunk_size")))
        self.register_buffer("class_weights", classes)

    def _checked(self, options: dict[str, object]) -> LossSpec:
        check_backend_options(options["backend"], options["chunk_size"])
        return super()._checked(options)

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | float | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of ``hidden [..., T, D] @ weight[V, D].T + bias`` against ``labels [..., T]``."""
        return linear_cross_entropy(
            hidden,
            weight,
            labels,
            bias=bias,
            num_items_in_batch=num_items_in_batch,
            token_weights=token_weights,
            class_weights=self.class_weights,
            backend=self._options["backend"],  # type: ignore[arg-type]  # checked in __init__
            chunk_size=self._options["chunk_size"],  # type: ignore[arg-type]  # checked in __init__
            **self.spec.options(),  # type: ignore[arg-type]  # options() values are object; LossSpec checked each
        )


def _picked(arguments: dict[str, object], names: tuple[str, ...]) -> dict[str, object]:
    """A constructor's options from its ``locals()``, by name, in the order of ``names``
    (its parameters are named as the options: ``tests/test_spec.py`` holds them to it)."""
    return {name: arguments[name] for name in names}


def _checked_class_weights(value: object, name: str = "class_weights") -> torch.Tensor | None:
    """A module's class weights, checked as far as they can be without the vocabulary size
    (``[V]``, floating point, finite, non-negative); kept as given (a buffer)."""
    if value is None:
        return None
    check_class_weights(value, None, None, torch.float64, name)
    return value.detach()  # type: ignore[attr-defined]  # checked: a tensor


def _legacy_reduction(size_average: bool | None, reduce: bool | None) -> Reduction:
    """Map PyTorch's deprecated ``size_average``/``reduce`` the way PyTorch does."""
    for name, value in (("size_average", size_average), ("reduce", reduce)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be None or a bool, got {value!r}")
    # A missing one defaults to True, as in torch.nn._reduction.legacy_get_string.
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    reduction: Reduction = "none" if not reduce else ("mean" if size_average else "sum")
    warnings.warn(
        f"size_average and reduce are deprecated (as in PyTorch); use reduction={reduction!r} instead",
        FutureWarning,
        stacklevel=3,
    )
    return reduction


# The options of the distillation modules, in signature order (chunk_size: the linear one's).
_DISTILL_OPTIONS = ("temperature", "alpha", "shift", "ignore_index", "reduction", "normalize")


class _DistillationOptions(_LossModule):
    """Distillation options, checked at construction and when set (see :mod:`lmloss.distill`)."""

    def _checked(self, options: dict[str, object]) -> LossSpec:
        from lmloss.distill import check_distill_options

        check_distill_options(
            options["temperature"],
            options["alpha"],
            options["shift"],
            options["ignore_index"],
            options["reduction"],
            options["normalize"],
        )
        if "chunk_size" in options:
            check_backend_options("auto", options["chunk_size"])
        return super()._checked(options)

    def _distill_options(self) -> dict[str, object]:
        return {k: v for k, v in self._options.items() if k != "chunk_size"}


class DistillationLoss(_DistillationOptions):
    """:func:`lmloss.distillation_loss` as a module: forward KL(teacher || student) x T^2,
    plus ``(1 - alpha)`` x cross-entropy.

    ``forward(student_logits [..., T, V], teacher_logits [..., T, V], labels [..., T], *,
    num_items_in_batch=None, token_weights=None)``.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        alpha: float = 1.0,
        shift: bool = True,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        normalize: Normalize = "token",
    ) -> None:
        super().__init__(**_picked(locals(), _DISTILL_OPTIONS))

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        num_items_in_batch: torch.Tensor | int | float | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from lmloss.distill import distillation_loss

        return distillation_loss(
            student_logits,
            teacher_logits,
            labels,
            num_items_in_batch=num_items_in_batch,
            token_weights=token_weights,
            **self._distill_options(),  # type: ignore[arg-type]  # checked by check_distill_options in __init__
        )


class LinearDistillationLoss(_DistillationOptions):
    """:func:`lmloss.linear_distillation_loss` as a module: distillation from both models'
    hidden states and ``lm_head`` weights, chunk by chunk, without ``[N, V]`` logits.

    ``forward(student_hidden [..., T, D], student_weight [V, D], teacher_hidden [..., T, D_t],
    teacher_weight [V, D_t], labels [..., T], *, student_bias=None, teacher_bias=None,
    num_items_in_batch=None, token_weights=None)``.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        alpha: float = 1.0,
        shift: bool = True,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        normalize: Normalize = "token",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(**_picked(locals(), (*_DISTILL_OPTIONS, "chunk_size")))

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        labels: torch.Tensor,
        *,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | float | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from lmloss.distill import linear_distillation_loss

        return linear_distillation_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            num_items_in_batch=num_items_in_batch,
            token_weights=token_weights,
            **self._options,  # type: ignore[arg-type]  # checked in __init__; a dict of mixed option types
        )
