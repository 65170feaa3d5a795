"""The autograd pattern of a loss whose gradients are made by chunks, outside the graph.

With ``reduction="sum"``/``"mean"`` the loss is linear in its gradients, so they are
made during forward and backward only scales them by the upstream scalar, in place.
With ``reduction="none"`` every token has its own upstream gradient, so backward
recomputes the chunks with those folded into the coefficients before the products
(Liger #968 is what goes wrong otherwise). The chunked and Triton backends,
linear distillation and the vocab-parallel loss share this pattern; each gives the
function that runs its chunks, ``run(coef, grads) -> [N] losses``.

Every loss on rows (``[N, D]`` hidden states, the head, targets and coefficients:
:class:`~lmloss._engine.chunks.Rows`) runs as one autograd function,
:func:`apply_rows`, given a :class:`RowsMethod` (its forward and backward): the
pattern above is one (:func:`rows_loss`), the Triton memory mode and the token
log-probs, which recompute in backward, are others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lmloss._engine.chunks import Grads, Rows, needs_grad, scored_rows
from lmloss._engine.guard import (
    check_forward_gradients,
    refuse_create_graph,
    remember_weight,
)

__all__ = [
    "Run",
    "Job",
    "rows_loss",
    "forward_made",
    "backward_made",
    "RowsMethod",
    "apply_rows",
    "save_rows",
    "saved_rows",
]

# run(coef, grads): the [N] weighted losses; with grads, adds the gradients of sum(coef * loss).
Run = Callable[[torch.Tensor, "Grads | None"], torch.Tensor]


def forward_made(
    ctx: Any,
    run: Run,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    coef: torch.Tensor,
    needs: tuple[bool, ...],
    reduce_sum: bool,
    *,
    zero_weight: bool = False,
) -> torch.Tensor:
    """The forward: the scalar sum with its gradients made now, or the ``[N]`` terms.

    ``inputs`` are ``(hidden, weight, bias)``; ``zero_weight`` as in :meth:`Grads.allocate`.
    The caller saves what its recompute needs for ``reduction="none"``.
    """
    ctx.reduce_sum, ctx.needs, ctx.zero_weight = reduce_sum, needs, zero_weight
    if not reduce_sum:
        return run(coef, None)
    # No gradient wanted (evaluation, frozen head and inputs): the loss alone.
    grads = Grads.allocate(*inputs, needs, zero_weight=zero_weight) if any(needs) else None
    losses = run(coef, grads)
    ctx.grads = grads
    remember_weight(ctx, inputs[1])
    return losses.sum()


def backward_made(
    ctx: Any,
    grad_output: torch.Tensor,
    run: Run | None,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    coef: torch.Tensor | None,
    what: str,
    hint: str,
    before_scale: Callable[[Grads], None] | None = None,
) -> Grads:
    """The backward: the forward's gradients scaled, or the chunks recomputed with each
    token's upstream gradient. ``inputs``/``coef`` are the saved ones (``reduction="none"``).
    ``before_scale`` sees the raw gradients first (e.g. to sum them over processes)."""
    if ctx.reduce_sum:
        check_forward_gradients(ctx, what, hint)
        # Drop ctx's reference: AccumulateGrad then adopts the buffers instead of copying them.
        grads, ctx.grads = ctx.grads, None
        if before_scale is not None:
            before_scale(grads)
        return grads.scaled_(grad_output)
    refuse_create_graph(what, hint)
    if run is None or inputs is None or coef is None:
        raise RuntimeError(f"lmloss {what}: backward of reduction='none' needs the saved inputs")
    grads = Grads.allocate(*inputs, ctx.needs, zero_weight=ctx.zero_weight)
    upstream = coef * grad_output.to(coef.dtype)  # each token's own upstream gradient, before the products
    with torch.autocast(inputs[0].device.type, enabled=False):  # the recompute matches forward
        run(upstream, grads)
    if before_scale is not None:
        before_scale(grads)
    return grads.finished()


@dataclass(frozen=True)
class Job:
    """A chunked loss on rows: its name and hint (for the guard's errors), and
    ``runner(rows, scored)``, which gives the ``run`` of its chunks over those rows
    (``scored``: the indices of the scored rows, or None for every row)."""

    what: str
    hint: str
    runner: Callable[[Rows, torch.Tensor | None], Run]
    zero_weight: bool = False  # fill the weight's gradient first (the chunks only add into it)


def rows_loss(rows: Rows, job: Job, reduce_sum: bool) -> torch.Tensor:
    """``sum_t coef[t] * loss_t`` (``reduce_sum``) or the ``[N]`` terms, with ``job``'s chunks
    under :func:`forward_made`/:func:`backward_made`."""
    return apply_rows(rows, _MadeByChunks(job, reduce_sum))


@dataclass(frozen=True)
class _MadeByChunks:
    """The :class:`RowsMethod` of a :class:`Job`: gradients made in forward (``reduce_sum``)
    or by recomputing the chunks in backward."""

    job: Job
    reduce_sum: bool

    def forward(self, ctx: Any, rows: Rows, scored: torch.Tensor | None) -> torch.Tensor:
        if not self.reduce_sum:
            save_rows(ctx, rows, scored)
        run = self.job.runner(rows, scored)
        return forward_made(
            ctx, run, rows.inputs, rows.coef, ctx.needs, self.reduce_sum, zero_weight=self.job.zero_weight
        )

    def backward(self, ctx: Any, grad_output: torch.Tensor) -> Grads:
        inputs = coef = run = None
        if not self.reduce_sum:
            rows, (scored,) = saved_rows(ctx)
            inputs, coef, run = rows.inputs, rows.coef, self.job.runner(rows, scored)
        return backward_made(ctx, grad_output, run, inputs, coef, self.job.what, self.job.hint)


# --- one autograd function for every loss on rows ----------------------------------------------


class RowsMethod(Protocol):
    """What a loss on rows computes inside :func:`apply_rows`'s autograd function.

    ``forward(ctx, rows, scored)``: the outputs, from the rows and the indices of the
    scored ones (``scored_rows`` of ``rows.coef``: None for every row); ``ctx.needs``
    says which of hidden, weight and bias want a gradient. It saves what backward
    needs with :func:`save_rows`. ``backward(ctx, *grad_outputs)``: the gradients of
    hidden, weight and bias (:class:`Grads`, cast back to the inputs' dtypes), from
    the upstream gradient of each output.
    """

    def forward(self, ctx: Any, rows: Rows, scored: torch.Tensor | None) -> Any: ...

    @property
    def backward(self) -> Callable[..., Grads]:
        """``backward(ctx, *grad_outputs)``: one upstream gradient per output, each method naming its own."""
        ...


def apply_rows(rows: Rows, method: RowsMethod) -> Any:
    """``method`` on ``rows`` as one autograd node whose gradients go to ``rows.hidden``,
    ``rows.weight`` and ``rows.bias`` (targets, coefficients and class weights are constants)."""
    needs = needs_grad(*rows.inputs)
    return _OnRows.apply(*rows.inputs, rows.targets, rows.coef, rows.class_weights, method, needs)


def save_rows(ctx: Any, rows: Rows, *extra: torch.Tensor | None) -> None:
    """In a :class:`RowsMethod`'s forward: save the rows and ``extra`` tensors (None allowed)."""
    ctx.save_for_backward(*rows.inputs, rows.targets, rows.coef, rows.class_weights, *extra)


def saved_rows(ctx: Any) -> tuple[Rows, tuple[Any, ...]]:
    """In its backward: the rows and the ``extra`` tensors saved by :func:`save_rows`."""
    hidden, weight, bias, targets, coef, class_weights, *extra = ctx.saved_tensors
    return Rows(hidden, weight, bias, targets, coef, class_weights), tuple(extra)


class _OnRows(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        coef: torch.Tensor,
        class_weights: torch.Tensor | None,
        method: RowsMethod,
        needs: tuple[bool, ...],
    ) -> Any:
        ctx.method, ctx.needs = method, needs
        return method.forward(ctx, Rows(hidden, weight, bias, targets, coef, class_weights), scored_rows(coef))

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor):
        grads = ctx.method.backward(ctx, *grad_outputs)
        return grads.hidden, grads.weight, grads.bias, None, None, None, None, None
