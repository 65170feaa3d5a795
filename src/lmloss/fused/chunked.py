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

import torch

from lmloss._engine.autograd import Run, backward_made, forward_made
from lmloss._engine.chunks import (
    DEFAULT_CHUNK_BYTES,
    MIN_CHUNK_ROWS,
    default_chunk_rows,
    needs_grad,
    run_chunks,
    scored_rows,
)
from lmloss._engine.reducer import LocalReducer
from lmloss._engine.rowmath import LossMath

__all__ = ["chunked_linear_cross_entropy", "default_chunk_rows", "DEFAULT_CHUNK_BYTES", "MIN_CHUNK_ROWS"]


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    coef: torch.Tensor,
    *,
    math: LossMath,
    reduce_sum: bool,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``sum_t coef[t] * loss_t`` (``reduce_sum``) or the ``[N]`` terms themselves.

    Args:
        hidden: ``[N, D]`` hidden states (rows are positions).
        weight: ``[V, D]``; bias: ``[V]`` or None.
        targets: ``[N]`` target ids; any value where ``coef`` is 0.
        coef: ``[N]`` float32/float64 factor of each position's loss (0: not scored).
        math: label smoothing, z-loss, softcap, DFT/focal weights.
        reduce_sum: return the scalar sum (gradients computed during forward)
            instead of the ``[N]`` per-position terms (gradients recomputed in backward).
        chunk_rows: tokens per chunk; default from ``default_chunk_rows``.
    """
    if chunk_rows is None:
        row_bytes = 4 * (2 if coef.dtype == torch.float64 else 1)
        row_bytes += hidden.element_size() if hidden.element_size() < 4 else 0
        row_bytes += 4 if math.softcap is not None else 0
        chunk_rows = default_chunk_rows(
            hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.element_size(), row_bytes
        )
    needs = needs_grad(hidden, weight, bias)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, coef, math, reduce_sum, chunk_rows, needs)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        coef: torch.Tensor,
        math: LossMath,
        reduce_sum: bool,
        chunk_rows: int,
        needs: tuple[bool, bool, bool],
    ) -> torch.Tensor:
        rows = scored_rows(coef)
        ctx.math, ctx.chunk_rows = math, chunk_rows
        if not reduce_sum:
            ctx.save_for_backward(hidden, weight, bias, targets, coef, rows)
        run = _runner(hidden, weight, bias, targets, rows, math, chunk_rows)
        return forward_made(ctx, run, (hidden, weight, bias), coef, needs, reduce_sum)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        inputs = coef = run = None
        if not ctx.reduce_sum:
            hidden, weight, bias, targets, coef, rows = ctx.saved_tensors
            inputs, run = (hidden, weight, bias), _runner(hidden, weight, bias, targets, rows, ctx.math, ctx.chunk_rows)
        grads = backward_made(ctx, grad_output, run, inputs, coef, "linear_cross_entropy", "use backend='reference'")
        return grads.hidden, grads.weight, grads.bias, None, None, None, None, None, None


def _runner(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rows: torch.Tensor | None,
    math: LossMath,
    chunk_rows: int,
) -> Run:
    """The chunk loop over these rows with the one-process reducer."""
    reducer = LocalReducer(weight.shape[0])
    return lambda coef, grads: run_chunks(hidden, weight, bias, targets, coef, rows, math, chunk_rows, grads, reducer)
