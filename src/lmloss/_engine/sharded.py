"""The autograd functions of a vocabulary-sharded loss: the engine's chunk loop with a
:class:`~lmloss._engine.reducer.ShardReducer`.

Each process holds a vocabulary shard (of the ``lm_head`` weight, or of the logits);
the reducer exchanges the row statistics, and the caller (``lmloss.parallel``)
provides the collectives: the reducer's ``gather`` and, for the fused form,
``sum_hidden``, which all-reduces the hidden-state gradient (each process holds
``dz_r @ W_r``, its shard's part of it), or None on one process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lmloss._engine.autograd import Run, backward_made, forward_made
from lmloss._engine.chunks import Grads, Reducer, Rows, chunk_indices, run_chunks, scored_rows
from lmloss._engine.guard import refuse_create_graph
from lmloss._engine.reducer import RowRecord, SavedReducer, ShardReducer, combine_stats
from lmloss._engine.rowmath import LossMath, logits_grad_, softcap_, token_terms

__all__ = ["ShardedLinearCE", "ShardedLogitsCE"]

SumHidden = Callable[[torch.Tensor], None]


def _summed(sum_hidden: SumHidden | None, any_row: bool) -> Callable[[Grads], None] | None:
    """Sums the hidden-state gradient over the shards (nothing to sum when no row was scored)."""
    if sum_hidden is None or not any_row:
        return None

    def before_scale(grads: Grads) -> None:
        if grads.hidden is not None:
            sum_hidden(grads.hidden)

    return before_scale


class ShardedLinearCE(torch.autograd.Function):
    """``[N, D]`` hidden states and a ``[V_r, D]`` weight shard -> the sum of the weighted
    losses (gradients made in forward) or the ``[N]`` terms (statistics kept for backward,
    which then needs no exchange)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        coef: torch.Tensor,
        reducer: ShardReducer,
        math: LossMath,
        reduce_sum: bool,
        chunk_rows: int,
        needs: tuple[bool, bool],
        sum_hidden: SumHidden | None,
    ) -> torch.Tensor:
        rows = scored_rows(coef)
        ctx.reducer, ctx.math, ctx.chunk_rows = reducer, math, chunk_rows
        ctx.sum_hidden, ctx.any_row = sum_hidden, rows is None or rows.numel() > 0
        # reduction="none": keep each row's statistics, so that backward needs no exchange.
        record = None if reduce_sum else RowRecord.zeros(hidden.shape[0], coef.dtype, hidden.device)
        run = _runner(Rows(hidden, weight, None, targets, coef), rows, math, chunk_rows, reducer, record)
        losses = forward_made(ctx, run, (hidden, weight, None), coef, needs, reduce_sum)
        if record is not None:
            saved = (hidden, weight, targets, coef, rows, record.lse, record.nll, record.sum_z)
            ctx.save_for_backward(*saved)  # rows may be None: every row
        return losses

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        inputs = coef = run = None
        if not ctx.reduce_sum:
            hidden, weight, targets, coef, rows, lse, nll, sum_z = ctx.saved_tensors
            # The statistics are known from forward: no exchange, only the gradients.
            saved = SavedReducer(
                RowRecord(lse, nll, sum_z), ctx.reducer.vocab_size, ctx.reducer.columns, ctx.reducer.row_classes
            )
            inputs = (hidden, weight, None)
            run = _runner(Rows(hidden, weight, None, targets, coef), rows, ctx.math, ctx.chunk_rows, saved)
        grads = backward_made(
            ctx,
            grad_output,
            run,
            inputs,
            coef,
            "vocab_parallel_linear_cross_entropy",
            "use reduction='none' and sum the result",
            before_scale=_summed(ctx.sum_hidden, ctx.any_row),
        )
        return grads.hidden, grads.weight, None, None, None, None, None, None, None, None


def _runner(
    rows: Rows,
    scored: torch.Tensor | None,
    math: LossMath,
    chunk_rows: int,
    reducer: Reducer,
    record: RowRecord | None = None,
) -> Run:
    """The chunk loop over the shard's rows (no bias), with ``run``'s coefficients."""
    return lambda coef, grads: run_chunks(rows.with_coef(coef), scored, math, chunk_rows, grads, reducer, record)


class ShardedLogitsCE(torch.autograd.Function):
    """``[N, V_r]`` logits shard -> ``[N]`` weighted per-row losses; one exchange in forward."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        targets: torch.Tensor,
        coef: torch.Tensor,
        reducer: ShardReducer,
        math: LossMath,
        chunk_rows: int,
    ) -> torch.Tensor:
        rows = scored_rows(coef)
        chunks = chunk_indices(logits.shape[0], rows, chunk_rows)
        losses = torch.zeros(logits.shape[0], dtype=coef.dtype, device=logits.device)
        record = RowRecord.zeros(logits.shape[0], coef.dtype, logits.device)
        if chunks:
            # Local statistics of every chunk first, then one exchange for all of them:
            # nothing here needs the global numbers before the end.
            stats = []
            for index in chunks:
                z = logits[index].to(coef.dtype, copy=True)
                softcap_(z, math.softcap)
                stats.append(reducer.local_stats_(z, *reducer.columns(targets[index]), math))
            lse, z_y, sum_z = combine_stats(reducer.gather(torch.cat(stats), True), coef.dtype)
            scored = slice(None) if rows is None else rows
            a = coef[scored]
            classes = reducer.row_classes(targets[scored])
            terms = token_terms(lse, lse - z_y, sum_z, math, reducer.vocab_size, classes)
            losses[scored] = torch.where(a != 0, terms.loss * a, torch.zeros_like(terms.loss))
            record.lse[scored], record.nll[scored], record.sum_z[scored] = lse, lse - z_y, sum_z
        ctx.reducer, ctx.math, ctx.chunk_rows = reducer, math, chunk_rows
        ctx.save_for_backward(*(logits, targets, coef, rows, record.lse, record.nll, record.sum_z))
        return losses

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        refuse_create_graph("vocab_parallel_cross_entropy", "use causal_lm_loss on gathered logits")
        logits, targets, coef, rows, lse, nll, sum_z = ctx.saved_tensors
        math, vocab = ctx.math, ctx.reducer.vocab_size
        saved = SavedReducer(RowRecord(lse, nll, sum_z), vocab, ctx.reducer.columns, ctx.reducer.row_classes)
        grad = torch.zeros_like(logits)
        upstream = coef * grad_output.to(coef.dtype)
        for index in chunk_indices(logits.shape[0], rows, ctx.chunk_rows):
            z = logits[index].to(coef.dtype, copy=True)
            cap = softcap_(z, math.softcap, torch.empty_like(z) if math.softcap is not None else None)
            stats = saved.stats_(z, targets[index], math, index, first=False, probs=True)
            terms = token_terms(stats.lse, stats.nll, stats.sum_z, math, vocab, stats.classes)
            logits_grad_(
                z,
                stats.y,
                upstream[index],
                stats.lse,
                terms,
                math,
                vocab,
                own=stats.own,
                cap=cap,
                classes=stats.classes,
            )
            grad[index] = z.to(grad.dtype)
        return grad, None, None, None, None, None
