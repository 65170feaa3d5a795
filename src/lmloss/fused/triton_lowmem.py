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

from typing import Any

import torch
import triton

from lmloss._engine.chunks import Grads, Rows, needs_grad, scored_rows
from lmloss._engine.guard import refuse_create_graph
from lmloss._engine.rowmath import LossMath, Terms
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
    rows = contiguous_rows(rows)
    needs = needs_grad(*rows.inputs)
    return _LowMem.apply(*rows.inputs, rows.targets, rows.coef, rows.class_weights, math, reduce_sum, needs)


class _LowMem(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        coef: torch.Tensor,
        class_weights: torch.Tensor | None,
        math: LossMath,
        reduce_sum: bool,
        needs: tuple[bool, bool, bool],
    ) -> torch.Tensor:
        rows = scored_rows(coef)
        y, a = (targets, coef) if rows is None else (targets[rows], coef[rows])
        lse, terms = _lowmem_forward(hidden, weight, bias, rows, y, math, class_weights)
        weighted = torch.where(a != 0, terms.loss * a, torch.zeros_like(terms.loss))
        losses = weighted if rows is None else weighted.new_zeros(hidden.shape[0]).index_copy_(0, rows, weighted)
        ctx.math, ctx.reduce_sum, ctx.needs = math, reduce_sum, needs
        # The DFT/focal weight and its term are the row's, whatever the upstream gradient.
        ctx.save_for_backward(hidden, weight, bias, rows, y, a, lse, terms.w, terms.k, class_weights)
        return losses.sum() if reduce_sum else losses

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        refuse_create_graph("linear_cross_entropy (triton-lowmem)", "use backend='reference'")
        hidden, weight, bias, rows, y, a, lse, w, k, class_weights = ctx.saved_tensors
        grads = Grads.allocate(hidden, weight, bias, ctx.needs, zero_weight=True)
        if any(ctx.needs) and y.numel() > 0:
            upstream = grad_output.to(torch.float32)
            if not ctx.reduce_sum and rows is not None:
                upstream = upstream[rows]
            g = a * upstream  # each scored row's factor of d(loss)
            coef = grad_coefficients(g, w, k, ctx.math, weight.shape[0], row_classes(class_weights, y))
            _lowmem_backward(hidden, weight, bias, rows, y, coef, lse, ctx.math, grads, class_weights)
        grads.finished()
        return grads.hidden, grads.weight, grads.bias, None, None, None, None, None, None


def _lowmem_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    y: torch.Tensor,
    math: LossMath,
    class_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, Terms]:
    """``[n]`` log-sum-exp and the row math's terms (unweighted loss) of the ``n`` rows (compact order)."""
    n, vocab = y.numel(), weight.shape[0]
    tile = tiles_for(vocab, interpreting()).forward
    splits, per_split = _vocab_splits(hidden.device, n, vocab, tile)
    part = torch.empty(4, splits, n, dtype=torch.float32, device=hidden.device)
    if n > 0:
        kernels_for(hidden.device).lowmem_forward_kernel[(triton.cdiv(n, tile.block_m), splits)](
            hidden, weight, hidden if bias is None else bias, part if class_weights is None else class_weights,
            y if rows is None else rows, y, part[0], part[1], part[2], part[3],
            n, vocab, hidden.shape[1], hidden.stride(0), weight.stride(0),
            1.0 if math.softcap is None else math.softcap, per_split,
            **math_constexprs(math, bias is not None, class_weights is not None), HAS_ROWS=rows is not None,
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
    return lse, terms_of_stats(lse, nll, total, vocab, math, row_classes(class_weights, y))


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


def _lowmem_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    y: torch.Tensor,
    coef: torch.Tensor,
    lse: torch.Tensor,
    math: LossMath,
    grads: Grads,
    class_weights: torch.Tensor | None,
) -> None:
    """Add the gradients of ``sum(g * loss)`` into ``grads`` (float32, atomically), with the
    ``[4, n]`` coefficients of ``g`` (:func:`grad_coefficients`)."""
    n, vocab = y.numel(), weight.shape[0]
    tile = tiles_for(vocab, interpreting()).backward
    dummy = lse  # any float32 tensor stands in for an absent gradient buffer
    dh, dw, db = grads.hidden, grads.weight, grads.bias
    grid = (triton.cdiv(n, tile.block_m), triton.cdiv(vocab, tile.block_v))
    kernels_for(hidden.device).lowmem_backward_kernel[grid](
        hidden, weight, hidden if bias is None else bias, lse if class_weights is None else class_weights,
        y if rows is None else rows, y, coef, lse,
        dummy if dh is None else dh, dummy if dw is None else dw, dummy if db is None else db,
        n, vocab, hidden.shape[1], hidden.stride(0), weight.stride(0),
        0 if dh is None else dh.stride(0), 0 if dw is None else dw.stride(0),
        1.0 if math.softcap is None else math.softcap,
        **math_constexprs(math, bias is not None, class_weights is not None), HAS_ROWS=rows is not None,
        NEED_DH=dh is not None, NEED_DW=dw is not None, NEED_DB=db is not None,
        **tile.constexprs(hidden.dtype), **tile.launch(),
    )  # fmt: skip
