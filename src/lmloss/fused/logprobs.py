"""Per-token log-probabilities and entropies from hidden states, chunk by chunk.

The checked entry point of the chunked backend of :func:`lmloss.linear_token_logprobs`:
the chunk loop, its gradient and the row statistics are the engine's
(:mod:`lmloss._engine.logprobs`, with the whole vocabulary in each chunk; the
vocab-parallel form in :mod:`lmloss.parallel` runs the same loop on a shard).
"""

from __future__ import annotations

import torch

from lmloss._engine.chunks import autocast_inputs, default_chunk_rows
from lmloss._engine.logprobs import LocalLogprobs, LogprobOptions, linear_logprobs
from lmloss._engine.plan import compute_dtype, plan_targets, to_label_alignment
from lmloss._validation import check_label_range, check_labels
from lmloss.fused import check_backend_options, check_linear
from lmloss.logprobs import check_logprob_options

__all__ = ["chunked_token_logprobs"]


def chunked_token_logprobs(
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
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(z / temperature)[label]`` (and the entropy) per target, without ``[N, V]`` logits.

    Args:
        hidden: ``[..., T, D]`` final hidden states; weight: ``[V, D]``; bias: ``[V]`` or None.
        labels: ``[..., T]`` token ids, ``ignore_index`` where nothing is scored; with
            ``shift=True`` position ``t - 1`` predicts ``labels[..., t]``.
        temperature: ``tau > 0``; the distribution is ``softmax(z / tau)``.
        softcap: ``s``: the logits are ``s * tanh((h W^T + b) / s)`` (before the temperature).
        with_entropy: also return the entropy of each scoring position's distribution.
        chunk_size: rows per chunk; default from a memory budget.

    Returns:
        ``(logprobs, entropy)``, each ``[..., T]`` aligned with ``labels`` (entry ``t``
        belongs to the target ``labels[..., t]``), float32 (float64 for float64 inputs),
        exactly 0 where nothing is scored; ``entropy`` is None unless ``with_entropy``.
        Both are differentiable with any upstream gradient (backward recomputes the chunks).
    """
    check_logprob_options(shift, ignore_index, temperature, softcap, with_entropy)
    check_backend_options("chunked", chunk_size)
    hidden, weight, bias = check_linear(*autocast_inputs(hidden, weight, bias))
    labels = check_labels(labels, hidden.shape[:-1])
    check_label_range(labels, weight.shape[0], ignore_index)
    dtype = compute_dtype(hidden.dtype)
    plan = plan_targets(labels, None, shift=shift, ignore_index=ignore_index, normalize="token", dtype=dtype)
    h = hidden.reshape(-1, hidden.shape[-1])
    if chunk_size is None:
        row_bytes = 3 * (8 if dtype == torch.float64 else 4) + (h.element_size() if h.element_size() < 4 else 0)
        chunk_size = default_chunk_rows(h.shape[0], weight.shape[0], h.shape[1], h.element_size(), row_bytes)
    options = LogprobOptions(float(temperature), None if softcap is None else float(softcap), with_entropy, chunk_size)
    logprobs, entropy = linear_logprobs(
        h, weight, bias, plan.targets.reshape(-1), plan.coef.reshape(-1) != 0, options, LocalLogprobs()
    )
    logprobs = to_label_alignment(logprobs.view(labels.shape), shift)
    return logprobs, (to_label_alignment(entropy.view(labels.shape), shift) if with_entropy else None)
