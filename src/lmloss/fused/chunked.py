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

from lmloss._engine.chunks import (
    DEFAULT_CHUNK_BYTES,
    MIN_CHUNK_ROWS,
    Grads,
    default_chunk_rows,
    needs_grad,
    run_chunks,
    scored_rows,
)
from lmloss._engine.guard import check_forward_gradients, refuse_create_graph, remember_weight
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
        ctx.math, ctx.reduce_sum, ctx.chunk_rows, ctx.needs = math, reduce_sum, chunk_rows, needs
        reducer = LocalReducer(weight.shape[0])
        if reduce_sum:
            # No gradient wanted (evaluation, frozen head and inputs): the loss alone.
            grads = Grads.allocate(hidden, weight, bias, needs) if any(needs) else None
            losses = run_chunks(hidden, weight, bias, targets, coef, rows, math, chunk_rows, grads, reducer)
            ctx.grads = grads
            remember_weight(ctx, weight)
            return losses.sum()
        losses = run_chunks(hidden, weight, bias, targets, coef, rows, math, chunk_rows, None, reducer)
        ctx.save_for_backward(hidden, weight, bias, targets, coef, rows)
        return losses

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        if ctx.reduce_sum:
            check_forward_gradients(ctx, "linear_cross_entropy", "use backend='reference'")
            # Drop ctx's reference: AccumulateGrad then adopts the buffers instead of copying them.
            grads, ctx.grads = ctx.grads.scaled_(grad_output), None
        else:
            refuse_create_graph("linear_cross_entropy", "use backend='reference'")
            hidden, weight, bias, targets, coef, rows = ctx.saved_tensors
            grads = Grads.allocate(hidden, weight, bias, ctx.needs)
            # Fold each token's upstream gradient into its coefficient before the products.
            upstream = coef * grad_output.to(coef.dtype)
            with torch.autocast(hidden.device.type, enabled=False):  # the recompute matches forward
                run_chunks(hidden, weight, bias, targets, upstream, rows, ctx.math, ctx.chunk_rows, grads,
                           LocalReducer(weight.shape[0]))
            grads = grads.finished()
        return grads.hidden, grads.weight, grads.bias, None, None, None, None, None, None
