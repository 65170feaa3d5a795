"""The ``"triton-lowmem"`` backend (Cut Cross-Entropy-style): logits exist only as register tiles.

Forward writes per-row log-sum-exp statistics (``O(tokens)`` memory); backward
recomputes the tiles and accumulates ``dh`` and ``dW`` with float32 atomics. Memory on
top of inputs and gradients: float32 ``dh``/``dW`` accumulators and a few ``[tokens]``
vectors. Backward may run more than once (``retain_graph`` works). The scored rows are
read through an index vector; under ``lmloss.validation(False)`` every row is computed
and a row whose gradient coefficients are all 0 is skipped like padding. Entry point
and the rest of the contract: :mod:`lmloss.fused.triton`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton

from lmloss._engine.autograd import apply_rows, save_rows, saved_rows
from lmloss._engine.chunks import Grads, Rows
from lmloss._engine.guard import refuse_create_graph
from lmloss._engine.rowmath import LossMath, RowClasses, Terms
from lmloss.fused.triton_launch import (
    Tile,
    contiguous_rows,
    grad_coefficients,
    interpreting,
    kernels_for,
    math_constexprs,
    row_classes,
    terms_of_stats,
    tiles_for,
)

__all__ = ["lowmem_rows_linear_cross_entropy"]


def lowmem_rows_linear_cross_entropy(rows: Rows, *, math: LossMath, reduce_sum: bool) -> torch.Tensor:
    """Memory mode on rows: ``sum_t coef[t] * loss_t`` (``reduce_sum``) or the ``[N]`` terms.

    Arguments as :func:`triton_rows_linear_cross_entropy` (no chunks). The gradients
    are made in backward by recomputing the logits tiles.
    """
    return apply_rows(contiguous_rows(rows), _LowMem(math, reduce_sum))


@dataclass(frozen=True)
class _Scored:
    """The rows as the kernels read them: the inputs, the ``[n]`` indices of the scored
    rows (None: every row, ``n = N``) and the ``[n]`` targets ``y`` and coefficients ``a``
    of those rows, in that compact order."""

    rows: Rows
    index: torch.Tensor | None
    y: torch.Tensor
    a: torch.Tensor

    @classmethod
    def of(cls, rows: Rows, index: torch.Tensor | None) -> _Scored:
        if index is None:
            return cls(rows, None, rows.targets, rows.coef)
        return cls(rows, index, rows.targets[index], rows.coef[index])

    def classes(self) -> RowClasses | None:
        return row_classes(self.rows.class_weights, self.y)


@dataclass(frozen=True)
class _LowMem:
    """The :class:`~lmloss._engine.autograd.RowsMethod` of the memory mode: forward keeps
    each row's log-sum-exp, backward recomputes the tiles (and may run more than once)."""

    math: LossMath
    reduce_sum: bool

    def forward(self, ctx: Any, rows: Rows, scored: torch.Tensor | None) -> torch.Tensor:
        kept = _Scored.of(rows, scored)
        lse, terms = _lowmem_forward(kept, self.math)
        a = kept.a
        weighted = torch.where(a != 0, terms.loss * a, torch.zeros_like(terms.loss))
        losses = weighted
        if scored is not None:  # back to every row's place
            losses = weighted.new_zeros(rows.hidden.shape[0]).index_copy_(0, scored, weighted)
        # The DFT/focal weight and its term are the row's, whatever the upstream gradient.
        save_rows(ctx, rows, scored, kept.y, a, lse, terms.w, terms.k)
        return losses.sum() if self.reduce_sum else losses

    def backward(self, ctx: Any, grad_output: torch.Tensor) -> Grads:
        refuse_create_graph("linear_cross_entropy (triton-lowmem)", "use backend='reference'")
        rows, (scored, y, a, lse, w, k) = saved_rows(ctx)
        kept = _Scored(rows, scored, y, a)
        grads = Grads.allocate(*rows.inputs, ctx.needs, zero_weight=True)
        if any(ctx.needs) and y.numel() > 0:
            upstream = grad_output.to(torch.float32)
            if not self.reduce_sum and scored is not None:
                upstream = upstream[scored]
            g = a * upstream  # each scored row's factor of d(loss)
            coef = grad_coefficients(g, w, k, self.math, rows.weight.shape[0], kept.classes())
            _lowmem_backward(kept, coef, lse, self.math, grads)
        return grads.finished()


def _lowmem_forward(kept: _Scored, math: LossMath) -> tuple[torch.Tensor, Terms]:
    """``[n]`` log-sum-exp and the row math's terms (unweighted loss) of the ``n`` scored rows (compact order)."""
    (hidden, weight, bias), class_weights, index, y = kept.rows.inputs, kept.rows.class_weights, kept.index, kept.y
    n, vocab = y.numel(), weight.shape[0]
    tile = tiles_for(vocab, interpreting()).forward
    splits, per_split = _vocab_splits(hidden.device, n, vocab, tile)
    part = torch.empty(4, splits, n, dtype=torch.float32, device=hidden.device)
    if n > 0:
        kernels_for(hidden.device).lowmem_forward_kernel[(triton.cdiv(n, tile.block_m), splits)](
            hidden, weight, hidden if bias is None else bias, part if class_weights is None else class_weights,
            y if index is None else index, y, part[0], part[1], part[2], part[3],
            n, vocab, hidden.shape[1], hidden.stride(0), weight.stride(0),
            1.0 if math.softcap is None else math.softcap, per_split,
            **math_constexprs(math, bias is not None, class_weights is not None), HAS_ROWS=index is not None,
            **tile.constexprs(hidden.dtype), **tile.launch(),
        )  # fmt: skip
    # Merge the splits: every split saw at least one column, so each max is finite.
    top = part[0].amax(dim=0)
    log_s = torch.log((part[1] * torch.exp(part[0] - top)).sum(dim=0))
    lse = top + log_s
    # nll = lse - target without lse's rounding: exactly log_s when the target is the max
    # (p = exp(-nll) near 1 keeps its precision, which focal weights depend on).
    nll = (top - part[2].sum(dim=0)) + log_s
    total = part[3].sum(dim=0) if math.label_smoothing > 0 else None
    return lse, terms_of_stats(lse, nll, total, vocab, math, kept.classes())


def _vocab_splits(device: torch.device, n: int, vocab: int, tile: Tile) -> tuple[int, int]:
    """``(splits, vocabulary blocks per split)``: enough programs to fill the GPU when
    the row blocks alone are few; every split gets at least one block."""
    blocks = triton.cdiv(vocab, tile.block_v)
    if device.type == "cuda" and not interpreting():
        programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        splits = triton.cdiv(programs, max(1, triton.cdiv(n, tile.block_m)))
    else:
        splits = 2  # the interpreter (tests): exercise the merge of splits
    splits = max(1, min(splits, blocks))
    return splits, triton.cdiv(blocks, splits)


def _lowmem_backward(kept: _Scored, coef: torch.Tensor, lse: torch.Tensor, math: LossMath, grads: Grads) -> None:
    """Add the gradients of ``sum(g * loss)`` into ``grads`` (float32, atomically), with the
    ``[4, n]`` coefficients of ``g`` (:func:`grad_coefficients`) and the ``[n]`` log-sum-exps."""
    (hidden, weight, bias), class_weights, index, y = kept.rows.inputs, kept.rows.class_weights, kept.index, kept.y
    n, vocab = y.numel(), weight.shape[0]
    tile = tiles_for(vocab, interpreting()).backward
    dummy = lse  # any float32 tensor stands in for an absent gradient buffer
    dh, dw, db = grads.hidden, grads.weight, grads.bias
    grid = (triton.cdiv(n, tile.block_m), triton.cdiv(vocab, tile.block_v))
    kernels_for(hidden.device).lowmem_backward_kernel[grid](
        hidden, weight, hidden if bias is None else bias, lse if class_weights is None else class_weights,
        y if index is None else index, y, coef, lse,
        dummy if dh is None else dh, dummy if dw is None else dw, dummy if db is None else db,
        n, vocab, hidden.shape[1], hidden.stride(0), weight.stride(0),
        0 if dh is None else dh.stride(0), 0 if dw is None else dw.stride(0),
        1.0 if math.softcap is None else math.softcap,
        **math_constexprs(math, bias is not None, class_weights is not None), HAS_ROWS=index is not None,
        NEED_DH=dh is not None, NEED_DW=dw is not None, NEED_DB=db is not None,
        **tile.constexprs(hidden.dtype), **tile.launch(),
    )  # fmt: skip
