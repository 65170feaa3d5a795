"""Per-row losses of materialized logits, chunk by chunk: the loop of the losses on logits.

The losses that take ``[N, V]`` logits (``causal_lm_loss``, ``distillation_loss``)
accept any float dtype and compute in float32 (float64 for float64). Upcasting the
logits at once would keep a float32 copy of all of them alive for backward; here rows
are upcast one chunk at a time, only the scored ones, and with several chunks each
chunk is recomputed in backward (activation checkpointing), so only the inputs' own
storage stays alive. The per-row math is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from lmloss._validation import value_checks_enabled

__all__ = ["LOGITS_CHUNK_BYTES", "RowLosses", "scored_row_losses"]

# Upper bound on the bytes of the float32 chunks of logits (all matrices of a chunk
# together). Large enough that the chunk loop costs nothing measurable, small enough
# that a 150k-vocabulary batch never holds a second full-size copy of its logits.
LOGITS_CHUNK_BYTES = 256 * 2**20

# row_losses(z_1, ..., z_k, y): the [n] losses of k [n, V] logit matrices (already in the
# compute dtype) and their [n] targets.
RowLosses = Callable[..., torch.Tensor]


def scored_row_losses(
    row_losses: RowLosses,
    logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    scored: torch.Tensor,
    dtype: torch.dtype,
    chunk_bytes: int,
) -> torch.Tensor:
    """``[N]`` losses ``row_losses(*z, y)`` of the scored rows, exactly 0 elsewhere.

    Args:
        row_losses: the per-row math (see ``RowLosses``).
        logits: ``k`` matrices ``[N, V]`` of any float dtype (e.g. a student's and a
            teacher's logits); rows are cast to ``dtype`` one chunk at a time.
        targets: ``[N]`` target ids; ``scored``: ``[N]`` bool, the rows that count.
        dtype: the compute dtype.
        chunk_bytes: budget of the ``k`` upcast chunks that live at once.

    With ``N == 0`` the result is an empty ``[0]`` tensor still attached to the graph.
    """
    n_rows, vocab_size = logits[0].shape
    rows = max(1, chunk_bytes // (len(logits) * vocab_size * (torch.finfo(dtype).bits // 8)))
    recompute = n_rows > rows and torch.is_grad_enabled() and any(z.requires_grad for z in logits)
    chunk_losses = partial(_chunk_losses, row_losses, dtype)
    pieces = []
    for y, keep, *z in zip(targets.split(rows), scored.split(rows), *(x.split(rows) for x in logits)):
        args = (y, keep, *z)
        pieces.append(checkpoint(chunk_losses, *args, use_reentrant=False) if recompute else chunk_losses(*args))
    if not pieces:  # N == 0: nothing to score, but stay attached to the graph.
        return logits[0].sum(dim=-1).to(dtype)
    return torch.cat(pieces)


def _chunk_losses(
    row_losses: RowLosses, dtype: torch.dtype, targets: torch.Tensor, scored: torch.Tensor, *logits: torch.Tensor
) -> torch.Tensor:
    """One chunk's ``[n]`` losses; only the scored rows are upcast and computed.

    With value checks off (graph capture) nothing may depend on tensor values, so
    every row is computed and the unscored ones are masked instead of skipped.
    """
    if not value_checks_enabled():
        safe_targets = torch.where(scored, targets, torch.zeros_like(targets))
        loss = row_losses(*(z.to(dtype) for z in logits), safe_targets)
        return torch.where(scored, loss, torch.zeros_like(loss))
    index = scored.nonzero().squeeze(1)
    if index.numel() == targets.shape[0]:  # the common case: skip the gather and scatter
        return row_losses(*(z.to(dtype) for z in logits), targets)
    loss = row_losses(*(z.index_select(0, index).to(dtype) for z in logits), targets.index_select(0, index))
    return loss.new_zeros(targets.shape[0]).index_copy(0, index, loss)
