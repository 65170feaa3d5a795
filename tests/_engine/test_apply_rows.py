"""The engine's one autograd function for losses on rows (``_engine.autograd.apply_rows``).

A small :class:`RowsMethod`, the weighted target logit ``coef * (h @ W^T + b)[y]`` and its
square as a second output, with gradients written by hand: what ``apply_rows`` gives the
method (the rows, the scored indices, which inputs want a gradient), what ``save_rows``
keeps for backward, and that the hand-made gradients reach exactly hidden, weight and bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import lmloss
from lmloss._engine.autograd import apply_rows, save_rows, saved_rows
from lmloss._engine.chunks import Grads, Rows


@dataclass(frozen=True)
class TargetLogit:
    """``[N]`` ``coef * z_y`` and ``(coef * z_y)^2``, with ``z = h @ W^T + b``; records what it was given."""

    seen: dict = field(default_factory=dict)

    def forward(self, ctx: Any, rows: Rows, scored: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.update(scored=scored, needs=ctx.needs, grad_mode=torch.is_grad_enabled())
        out = _target_logit(rows)
        save_rows(ctx, rows, scored, None)  # None: an absent extra survives the round trip
        return out, out.square()

    def backward(self, ctx: Any, grad_out: torch.Tensor, grad_square: torch.Tensor) -> Grads:
        rows, (scored, absent) = saved_rows(ctx)
        self.seen.update(saved_scored=scored, absent=absent)
        g = rows.coef * (grad_out + 2 * _target_logit(rows) * grad_square)  # d(sum)/d z_y per row
        grads = Grads.allocate(*rows.inputs, ctx.needs, zero_weight=True)
        if grads.hidden is not None:
            grads.hidden += g.unsqueeze(1) * rows.weight[rows.targets]
        if grads.weight is not None:
            grads.weight.index_add_(0, rows.targets, g.unsqueeze(1) * rows.hidden)
        if grads.bias is not None:
            grads.bias.index_add_(0, rows.targets, g)
        return grads.finished()


def _target_logit(rows: Rows) -> torch.Tensor:
    z_y = (rows.hidden * rows.weight[rows.targets]).sum(dim=1)
    return rows.coef * (z_y if rows.bias is None else z_y + rows.bias[rows.targets])


def _rows(frozen_weight: bool = False, coef: list[float] | None = None) -> Rows:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, generator=g, dtype=torch.float64).requires_grad_(not frozen_weight)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 6, 0, 6, 3])
    weights = torch.tensor(coef if coef is not None else [1.0, 0.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    return Rows(hidden, weight, bias, targets, weights)


@pytest.mark.parametrize("frozen_weight", [False, True])
def test_gradients_reach_hidden_weight_and_bias_as_autograd_s(frozen_weight):
    rows = _rows(frozen_weight)
    method = TargetLogit()
    out, square = apply_rows(rows, method)
    up = torch.tensor([0.3, -1.0, 2.0, 0.7, 1.5], dtype=torch.float64)
    wanted = [t for t in rows.inputs if t is not None and t.requires_grad]
    got = torch.autograd.grad((out * up + square).sum(), wanted)
    want_out = _target_logit(rows)
    want = torch.autograd.grad((want_out * up + want_out.square()).sum(), wanted)
    torch.testing.assert_close(out, want_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert method.seen["needs"] == (True, not frozen_weight, True)
    assert method.seen["grad_mode"] is False  # forward runs as autograd runs it: no graph inside
    assert method.seen["absent"] is None
    torch.testing.assert_close(method.seen["saved_scored"], torch.tensor([0, 2, 3]))


def test_the_method_gets_the_scored_rows_or_none():
    """The indices of the rows with a non-zero coefficient; None when every row is scored,
    or under ``lmloss.validation(False)`` (static shapes: nothing synchronises)."""
    seen = TargetLogit().seen
    apply_rows(_rows(), TargetLogit(seen))
    torch.testing.assert_close(seen["scored"], torch.tensor([0, 2, 3]))
    apply_rows(_rows(coef=[1.0, 1.0, 0.5, 2.0, 3.0]), TargetLogit(seen))
    assert seen["scored"] is None
    with lmloss.validation(False):
        apply_rows(_rows(), TargetLogit(seen))
    assert seen["scored"] is None


def test_no_gradient_wanted():
    """Under ``no_grad`` the method is told that no input wants a gradient; the outputs are constants."""
    method = TargetLogit()
    with torch.no_grad():
        out, _ = apply_rows(_rows(), method)
    assert method.seen["needs"] == (False, False, False) and out.grad_fn is None


def test_with_coef_replaces_only_the_coefficients():
    rows = _rows()
    other = rows.with_coef(torch.ones(5, dtype=torch.float64))
    assert (
        all(a is b for a, b in zip(other.inputs, rows.inputs))
        and other.targets is rows.targets
        and bool((other.coef == 1).all())
    )
    assert not bool((rows.coef == 1).all())
