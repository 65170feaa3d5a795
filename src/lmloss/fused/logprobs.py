"""Per-token log-probabilities and entropies from hidden states, chunk by chunk.

The checked entry point of the chunked backend of :func:`lmloss.linear_token_logprobs`:
the chunk loop, its gradient and the row statistics are the engine's
(:mod:`lmloss._engine.logprobs`, with the whole vocabulary in each chunk; the
vocab-parallel form in :mod:`lmloss.parallel` runs the same loop on a shard).
"""

from __future__ import annotations

import torch

from lmloss._engine.chunks import autocast_inputs, default_chunk_rows
from lmloss._engine.logprobs import LocalLogprobs, linear_logprobs
from lmloss._engine.plan import compute_dtype
from lmloss._validation import check_label_range
from lmloss.logprobs import LogprobSpec, TokenLogprobs

__all__ = ["chunked_token_logprobs"]


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    spec: LogprobSpec,
    chunk_size: int | None,
) -> TokenLogprobs:
    """``log softmax(z / temperature)[label]`` (and the entropy) per target, without ``[N, V]`` logits.

    Called by :func:`lmloss.linear_token_logprobs` after it has checked the tensors'
    shapes, dtypes and devices, ``chunk_size`` and the options (``spec``).

    Args:
        hidden: ``[..., T, D]`` final hidden states; weight: ``[V, D]``; bias: ``[V]`` or None.
        labels: ``[..., T]`` token ids, ``ignore_index`` where nothing is scored; with
            ``shift=True`` position ``t - 1`` predicts ``labels[..., t]``.
        spec: the options (shift, ignore_index, temperature, softcap, with_entropy).
        chunk_size: rows per chunk; default (None) from a memory budget.

    Returns:
        ``(logprobs, entropy)``, each ``[..., T]`` aligned with ``labels`` (entry ``t``
        belongs to the target ``labels[..., t]``), float32 (float64 for float64 inputs),
        exactly 0 where nothing is scored; ``entropy`` is None unless ``with_entropy``.
        Both are differentiable with any upstream gradient (backward recomputes the chunks).
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_label_range(labels, weight.shape[0], spec.ignore_index)
    dtype = compute_dtype(hidden.dtype)
    plan = spec.plan(labels, dtype)
    h = hidden.reshape(-1, hidden.shape[-1])
    if chunk_size is None:
        row_bytes = 3 * (8 if dtype == torch.float64 else 4) + (h.element_size() if h.element_size() < 4 else 0)
        chunk_size = default_chunk_rows(h.shape[0], weight.shape[0], h.shape[1], h.element_size(), row_bytes)
    logprobs, entropy = linear_logprobs(
        h,
        weight,
        bias,
        plan.targets.reshape(-1),
        plan.coef.reshape(-1) != 0,
        spec.engine_options(chunk_size),
        LocalLogprobs(),
    )
    return spec.result(logprobs, entropy, labels.shape)
