"""Pure PyTorch fused linear cross-entropy: chunks of tokens, never ``[N, V]`` logits.

The chunk loop, its buffers and the per-token math are the engine's
(:mod:`lmloss._engine.chunks`, :mod:`lmloss._engine.rowmath`, with the one-process
:class:`~lmloss._engine.reducer.LocalReducer`); this module is the autograd function
around them.

With ``reduction="sum"``/``"mean"`` the gradients are complete after the forward
pass (the loss is linear in them), and backward only scales them by the upstream
scalar, in place. With ``reduction="none"`` every token has its own upstream
gradient, so backward recomputes the chunks with those folded in before the
products (Liger #968 is what goes wrong otherwise). Either way the gradients are
made outside autograd's graph: ``create_graph=True`` is refused (``_engine.guard``).
"""

from __future__ import annotations

from functools import partial

import torch

from lmloss._engine.autograd import Job, Run, rows_loss
from lmloss._engine.chunks import DEFAULT_CHUNK_BYTES, MIN_CHUNK_ROWS, Rows, default_chunk_rows, run_chunks
from lmloss._engine.reducer import LocalReducer
from lmloss._engine.rowmath import LossMath

__all__ = ["chunked_linear_cross_entropy", "default_chunk_rows", "DEFAULT_CHUNK_BYTES", "MIN_CHUNK_ROWS"]


def chunked_linear_cross_entropy(
    rows: Rows, *, math: LossMath, reduce_sum: bool, chunk_rows: int | None = None
) -> torch.Tensor:
    """``sum_t coef[t] * loss_t`` (``reduce_sum``) or the ``[N]`` terms themselves.

    Args:
        rows: the hidden states, head, targets and coefficients (``_engine.chunks.Rows``).
        math: label smoothing, z-loss, softcap, DFT/focal weights (class weights travel in ``rows``).
        reduce_sum: return the scalar sum (gradients computed during forward)
            instead of the ``[N]`` per-position terms (gradients recomputed in backward).
        chunk_rows: tokens per chunk; default from ``default_chunk_rows``.
    """
    hidden, weight = rows.hidden, rows.weight
    if chunk_rows is None:
        row_bytes = 4 * (2 if rows.coef.dtype == torch.float64 else 1)
        row_bytes += hidden.element_size() if hidden.element_size() < 4 else 0
        row_bytes += 4 if math.softcap is not None else 0
        chunk_rows = default_chunk_rows(
            hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.element_size(), row_bytes
        )
    job = Job("linear_cross_entropy", "use backend='reference'", partial(_runner, math, chunk_rows))
    return rows_loss(rows, job, reduce_sum)


def _runner(math: LossMath, chunk_rows: int, rows: Rows, scored: torch.Tensor | None) -> Run:
    """The chunk loop with the one-process reducer."""
    reducer = LocalReducer(rows.weight.shape[0], rows.class_weights)
    return lambda coef, grads: run_chunks(rows.with_coef(coef), scored, math, chunk_rows, grads, reducer)
