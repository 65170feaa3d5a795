"""Per-token log-probabilities and entropy of the target tokens: what RL and preference losses need.

``token_logprobs`` works on materialized logits and is written straightforwardly: it
is the reference the fused form is tested against. ``linear_token_logprobs`` takes
hidden states and the ``lm_head`` weight; its ``"reference"`` backend materializes the
logits, its ``"chunked"`` backend (``lmloss.fused.logprobs``) never does.

Alignment is that of ``causal_lm_loss(..., reduction="none")``: entry ``t`` of the
output belongs to ``labels[..., t]``, predicted by position ``t - 1`` when
``shift=True``; entries with nothing scored are exactly 0, and so is their gradient.
Per scored position, with ``z`` its logits (float32 whatever the input dtype)::

    z' = softcap * tanh(z / softcap)       (if softcap)
    p  = softmax(z' / temperature)
    logprob = log p[label],   entropy = -sum_v p_v log p_v
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal, NamedTuple, TypedDict

import torch
import torch.nn.functional as F

from lmloss._engine.logprobs import LogprobOptions
from lmloss._engine.plan import TargetPlan, plan_targets, to_label_alignment
from lmloss._spec import check_softcap
from lmloss._validation import (
    check_bool,
    check_choice,
    check_int,
    check_keywords,
    check_label_range,
    check_labels,
    check_temperature,
)
from lmloss.fused import REFERENCE_MAX_LOGITS, check_linear

__all__ = [
    "LOGPROB_BACKENDS",
    "LogprobKeywords",
    "LogprobSpec",
    "TokenLogprobs",
    "linear_token_logprobs",
    "token_logprobs",
]

LOGPROB_BACKENDS: tuple[str, ...] = ("auto", "reference", "chunked")


class TokenLogprobs(NamedTuple):
    """``logprobs``: ``[..., T]`` float32 log-probs of the labels; ``entropy``: ``[..., T]``
    float32 entropies of the same distributions, or ``None`` unless asked for."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


@dataclass(frozen=True)
class LogprobSpec:
    """The options of the token log-probs (as in :func:`token_logprobs`), checked once on
    construction; every backend and the vocab-parallel form take them from here."""

    shift: bool = True
    ignore_index: int = -100
    temperature: float = 1.0
    softcap: float | None = None
    with_entropy: bool = False

    def __post_init__(self) -> None:
        check_bool("shift", self.shift)
        check_int("ignore_index", self.ignore_index)
        check_bool("with_entropy", self.with_entropy)
        check_temperature(self.temperature)
        check_softcap(self.softcap)

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, object]) -> LogprobSpec:
        """The spec of an entry point's explicit keyword parameters, by name (its ``locals()``)."""
        return cls(**{name: arguments[name] for name in LOGPROB_OPTIONS})  # type: ignore[arg-type]  # checked here

    @classmethod
    def from_keywords(cls, where: str, options: Mapping[str, object]) -> LogprobSpec:
        """The spec of the ``**options`` that ``where`` took; an unknown keyword is a ``TypeError``."""
        check_keywords(where, options, LOGPROB_OPTIONS)
        return cls(**options)  # type: ignore[arg-type]  # each option checked by __post_init__

    def plan(self, labels: torch.Tensor, dtype: torch.dtype) -> TargetPlan:
        """The targets of ``labels`` ``[..., T]``: aligned, one unit coefficient per scored position."""
        return plan_targets(
            labels, None, shift=self.shift, ignore_index=self.ignore_index, normalize="token", dtype=dtype
        )

    def engine_options(self, chunk_size: int) -> LogprobOptions:
        """What the engine's chunk loop needs, with ``chunk_size`` rows per chunk."""
        softcap = None if self.softcap is None else float(self.softcap)
        return LogprobOptions(float(self.temperature), softcap, self.with_entropy, chunk_size)

    def result(self, logprobs: torch.Tensor, entropy: torch.Tensor, shape: torch.Size) -> TokenLogprobs:
        """Per-position ``[N]`` outputs of the engine moved to label alignment, shaped ``shape``
        (``entropy`` kept only when asked for)."""
        aligned = to_label_alignment(logprobs.view(shape), self.shift)
        return TokenLogprobs(
            aligned, to_label_alignment(entropy.view(shape), self.shift) if self.with_entropy else None
        )


LOGPROB_OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(LogprobSpec))


class LogprobKeywords(TypedDict, total=False):
    """The options of :class:`LogprobSpec` as keywords, for ``**options: Unpack[LogprobKeywords]``."""

    shift: bool
    ignore_index: int
    temperature: float
    softcap: float | None
    with_entropy: bool


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool = True,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    with_entropy: bool = False,
) -> TokenLogprobs:
    """Log-probs (and entropy) of ``labels`` under ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., T, V]`` any float dtype (upcast to float32 before anything else).
        labels: ``[..., T]`` integer token ids, ``ignore_index`` where nothing is scored.
        shift: ``True``: position ``t`` predicts ``labels[..., t + 1]``; ``False``: aligned.
        ignore_index: label value that is not scored.
        temperature: divides the (softcapped) logits, ``> 0`` (the sampling temperature).
        softcap: ``s * tanh(z / s)`` is applied to the logits first (Gemma 2), ``> 0``.
        with_entropy: also return the entropy of each scored distribution.

    Returns:
        :class:`TokenLogprobs`, each ``[..., T]`` float32, aligned with ``labels``.
    """
    return _logits_logprobs(logits, labels, LogprobSpec.from_arguments(locals()))


def _logits_logprobs(logits: torch.Tensor, labels: torch.Tensor, spec: LogprobSpec) -> TokenLogprobs:
    """:func:`token_logprobs` with checked options: ``logits`` ``[..., T, V]``, ``labels`` ``[..., T]``."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim < 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating [..., T, V] tensor, got {shape}")
    labels = check_labels(labels, logits.shape[:-1])
    check_label_range(labels, logits.shape[-1], spec.ignore_index)
    plan = spec.plan(labels, torch.float32)
    scored = plan.coef > 0
    z = logits.float()
    if spec.softcap is not None:
        z = spec.softcap * torch.tanh(z / spec.softcap)
    log_p = torch.log_softmax(z / spec.temperature, dim=-1)
    picked = log_p.gather(-1, plan.targets.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    # where() rather than a product: an unscored position gets 0 and a zero gradient.
    logprobs = to_label_alignment(torch.where(scored, picked, 0.0), spec.shift)
    entropy = None
    if spec.with_entropy:
        per_position = -(log_p.exp() * log_p).sum(-1)
        entropy = to_label_alignment(torch.where(scored, per_position, 0.0), spec.shift)
    return TokenLogprobs(logprobs, entropy)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    shift: bool = True,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    with_entropy: bool = False,
    backend: Literal["auto", "reference", "chunked"] = "auto",
    chunk_size: int | None = None,
) -> TokenLogprobs:
    """:func:`token_logprobs` of ``hidden @ weight.T + bias``, from hidden states.

    Args:
        hidden: ``[..., T, D]`` hidden states (the input of ``lm_head``).
        weight: ``[V, D]`` the ``lm_head.weight``, same dtype and device as ``hidden``.
        labels: ``[..., T]`` integer token ids.
        bias: optional ``[V]`` ``lm_head.bias``.
        shift, ignore_index, temperature, softcap, with_entropy: as in :func:`token_logprobs`.
        backend: ``"reference"`` materializes the logits; ``"chunked"`` recomputes them
            chunk by chunk (``lmloss.fused.logprobs``, never ``[N, V]``); ``"auto"`` takes
            the reference for small problems and ``"chunked"`` otherwise.
        chunk_size: tokens per chunk for ``"chunked"`` (``None``: chosen from the sizes).

    Returns:
        :class:`TokenLogprobs`, each ``[..., T]`` float32, aligned with ``labels``.
    """
    spec = LogprobSpec.from_arguments(locals())
    check_choice("backend", backend, LOGPROB_BACKENDS)
    if chunk_size is not None and check_int("chunk_size", chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 tokens, got {chunk_size}")
    hidden, weight, bias = check_linear(hidden, weight, bias)
    labels = check_labels(labels, hidden.shape[:-1])
    if _pick_backend(backend, hidden, weight) == "reference":
        return _logits_logprobs(F.linear(hidden, weight, bias), labels, spec)
    # Imported on use: lmloss.fused.logprobs imports this module (for LogprobSpec).
    from lmloss.fused.logprobs import chunked_token_logprobs

    return chunked_token_logprobs(hidden, weight, bias, labels, spec, chunk_size)


def _pick_backend(backend: str, hidden: torch.Tensor, weight: torch.Tensor) -> str:
    if backend != "auto":
        return backend
    n_tokens = hidden.numel() // max(hidden.shape[-1], 1)
    return "reference" if n_tokens * weight.shape[0] <= REFERENCE_MAX_LOGITS else "chunked"
