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

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from lmloss._engine.plan import plan_targets, to_label_alignment
from lmloss._spec import check_softcap
from lmloss._validation import check_bool, check_choice, check_int, check_label_range, check_labels, check_temperature
from lmloss.fused import REFERENCE_MAX_LOGITS, check_linear

__all__ = ["LOGPROB_BACKENDS", "TokenLogprobs", "linear_token_logprobs", "token_logprobs"]

LOGPROB_BACKENDS: tuple[str, ...] = ("auto", "reference", "chunked")


class TokenLogprobs(NamedTuple):
    """``logprobs``: ``[..., T]`` float32 log-probs of the labels; ``entropy``: ``[..., T]``
    float32 entropies of the same distributions, or ``None`` unless asked for."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


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
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim < 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating [..., T, V] tensor, got {shape}")
    labels = check_labels(labels, logits.shape[:-1])
    check_logprob_options(shift, ignore_index, temperature, softcap, with_entropy)
    check_label_range(labels, logits.shape[-1], ignore_index)
    plan = plan_targets(labels, None, shift=shift, ignore_index=ignore_index, normalize="token", dtype=torch.float32)
    scored = plan.coef > 0
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z / temperature, dim=-1)
    picked = log_p.gather(-1, plan.targets.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    # where() rather than a product: an unscored position gets 0 and a zero gradient.
    logprobs = to_label_alignment(torch.where(scored, picked, 0.0), shift)
    entropy = None
    if with_entropy:
        per_position = -(log_p.exp() * log_p).sum(-1)
        entropy = to_label_alignment(torch.where(scored, per_position, 0.0), shift)
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
    check_choice("backend", backend, LOGPROB_BACKENDS)
    if chunk_size is not None and check_int("chunk_size", chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 tokens, got {chunk_size}")
    hidden, weight, bias = check_linear(hidden, weight, bias)
    labels = check_labels(labels, hidden.shape[:-1])
    check_logprob_options(shift, ignore_index, temperature, softcap, with_entropy)
    chosen = _pick_backend(backend, hidden, weight)
    if chosen == "reference":
        logits = F.linear(hidden, weight, bias)
        return token_logprobs(
            logits,
            labels,
            shift=shift,
            ignore_index=ignore_index,
            temperature=temperature,
            softcap=softcap,
            with_entropy=with_entropy,
        )
    # Imported on use: lmloss.fused.logprobs imports this module (for the option checks).
    from lmloss.fused.logprobs import chunked_token_logprobs

    logprobs, entropy = chunked_token_logprobs(
        hidden,
        weight,
        labels,
        bias=bias,
        shift=shift,
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        with_entropy=with_entropy,
        chunk_size=chunk_size,
    )
    return TokenLogprobs(logprobs, entropy)


def _pick_backend(backend: str, hidden: torch.Tensor, weight: torch.Tensor) -> str:
    if backend != "auto":
        return backend
    n_tokens = hidden.numel() // max(hidden.shape[-1], 1)
    return "reference" if n_tokens * weight.shape[0] <= REFERENCE_MAX_LOGITS else "chunked"


def check_logprob_options(
    shift: object, ignore_index: object, temperature: object, softcap: object, with_entropy: object
) -> None:
    """The options of the token log-probs, as :func:`linear_token_logprobs` takes them (every
    backend checks them alike); raises ``ValueError``/``TypeError`` naming the option."""
    check_bool("shift", shift)
    check_int("ignore_index", ignore_index)
    check_bool("with_entropy", with_entropy)
    check_temperature(temperature)
    check_softcap(softcap)
