"""Issue 12, item 6: the loss entry points at their edges, each from its reproduction."""

from __future__ import annotations

import pytest
import torch

import lmloss
from lmloss import causal_lm_loss, linear_cross_entropy, validation
from lmloss.distill import linear_distillation_loss

BACKENDS = ["reference", "auto", "chunked"]


def _problem(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 6, 5, generator=g, dtype=dtype)
    weight = torch.randn(11, 5, generator=g, dtype=dtype)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    return hidden, weight, labels


# --- ignore_index must fit the labels' dtype -------------------------------------------------


@pytest.mark.parametrize(
    "ignore_index, dtype",
    [(2**32 - 1, torch.int32), (2**31, torch.int32), (-(2**31) - 1, torch.int32), (2**63, torch.int64)],
)
def test_ignore_index_outside_the_labels_dtype_is_refused(ignore_index, dtype):
    """int32 labels with ignore_index=2**32-1 silently ignored the label -1; others raised RuntimeError."""
    hidden, weight, labels = _problem()
    labels = labels.to(dtype)
    with pytest.raises(ValueError, match=rf"ignore_index={ignore_index} does not fit the labels' dtype"):
        causal_lm_loss(hidden @ weight.T, labels, ignore_index=ignore_index)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="does not fit the labels' dtype"):
            linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, backend=backend)
    with pytest.raises(ValueError, match="does not fit the labels' dtype"):
        lmloss.count_targets(labels, ignore_index=ignore_index)


def test_int32_labels_compare_exactly():
    hidden, weight, labels = _problem()
    labels[0, 2] = -1  # not the ignore_index: an out-of-vocabulary label
    with pytest.raises(ValueError, match=r"labels\[0, 2\] = -1 is outside the vocabulary"):
        causal_lm_loss(hidden @ weight.T, labels.int(), ignore_index=2**31 - 1)
    labels[0, 2] = 2**31 - 1
    got = causal_lm_loss(hidden @ weight.T, labels.int(), ignore_index=2**31 - 1)
    want = causal_lm_loss(hidden @ weight.T, labels, ignore_index=2**31 - 1)
    torch.testing.assert_close(got, want)


# --- unscored rows never reach the products ----------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("static", [False, True], ids=["default", "validation-off"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_hidden_state_in_an_unscored_row_leaves_gradients_finite(backend, static, reduction):
    """A NaN hidden state at padding or at the last position (which scores nothing) made
    the reference's weight gradient NaN (0 * NaN in dz^T @ h); every backend must agree."""
    hidden, weight, labels = _problem()
    labels[1, 3] = -100  # position 2 predicts it: unscored
    clean = hidden.clone()
    hidden[1, 2] = float("nan")
    hidden[0, -1] = float("inf")  # the last position scores nothing when shifted
    clean[1, 2] = 0.0
    clean[0, -1] = 0.0
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, clean, weight)]
    with validation(not static):
        loss = linear_cross_entropy(leaves[0], leaves[1], labels, backend=backend, reduction=reduction).sum()
        want = linear_cross_entropy(leaves[2], leaves[3], labels, backend=backend, reduction=reduction).sum()
    loss.backward()  # with reduction="none" the chunks are recomputed here, with value checks on again
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(leaves[1].grad, leaves[3].grad)
    scored = torch.ones(2, 6, 1, dtype=torch.bool)
    scored[1, 2] = scored[0, -1] = False
    torch.testing.assert_close(torch.where(scored, leaves[0].grad, 0.0), torch.where(scored, leaves[2].grad, 0.0))
    assert bool(leaves[0].grad.isfinite().all())


def test_reduction_none_of_a_non_finite_unscored_row_is_zero():
    hidden, weight, labels = _problem()
    hidden[0, -1] = float("nan")
    for backend in BACKENDS:
        per_token = linear_cross_entropy(hidden, weight, labels, backend=backend, reduction="none")
        assert bool(per_token.isfinite().all()), backend


# --- create_graph through gradients made outside the graph --------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_create_graph_through_the_chunked_backend_raises(reduction):
    """It came back without a graph (a gradient penalty silently constant), or with
    reduction='none' as 'mm(): functions with out=... arguments don't support automatic differentiation'."""
    hidden, weight, labels = _problem()
    hidden.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, labels, backend="chunked", reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="create_graph=True \\(double backward\\) is not supported"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_create_graph_through_linear_distillation_raises():
    hidden, weight, labels = _problem()
    hidden.requires_grad_()
    loss = linear_distillation_loss(hidden, weight, hidden.detach(), weight, labels, reduction="none").sum()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_create_graph_through_the_reference_backend_is_second_order():
    """The reference differentiates twice: the gradient penalty's gradient matches float64 autograd
    of F.cross_entropy written out."""
    hidden, weight, labels = _problem()
    hidden.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, labels, backend="reference")
    (g,) = torch.autograd.grad(loss, hidden, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), hidden)
    h2 = hidden.detach().clone().requires_grad_()
    z = (h2 @ weight.T)[:, :-1].reshape(-1, 11)
    truth = torch.nn.functional.cross_entropy(z, labels[:, 1:].reshape(-1))
    (t,) = torch.autograd.grad(truth, h2, create_graph=True)
    (tt,) = torch.autograd.grad(t.square().sum(), h2)
    torch.testing.assert_close(gg, tt)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("static", [False, True], ids=["default", "validation-off"])
def test_linear_distillation_keeps_non_finite_unscored_rows_out(static, reduction):
    hidden, weight, labels = _problem()
    teacher_hidden = hidden.clone()
    hidden[0, -1] = float("nan")  # the last position scores nothing
    student = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    with validation(not static):
        loss = linear_distillation_loss(*student, teacher_hidden, weight, labels, alpha=0.5, reduction=reduction)
    loss.sum().backward()
    assert bool(loss.isfinite().all()) and bool(student[1].grad.isfinite().all())


# --- labels on another device than the scores --------------------------------------------------


@pytest.mark.parametrize(
    "entry", ["causal_lm_loss", "linear_cross_entropy", "distillation_loss", "linear_distillation_loss"]
)
def test_labels_on_another_device_name_both_devices(entry):
    """Every entry point refuses labels on another device with one message naming both."""
    hidden, weight, labels = _problem()
    labels = labels.to("meta")
    logits = hidden @ weight.T
    call = {
        "causal_lm_loss": lambda: causal_lm_loss(logits, labels),
        "linear_cross_entropy": lambda: linear_cross_entropy(hidden, weight, labels, backend="chunked"),
        "distillation_loss": lambda: lmloss.distill.distillation_loss(logits, logits, labels),
        "linear_distillation_loss": lambda: linear_distillation_loss(hidden, weight, hidden, weight, labels),
    }[entry]
    with pytest.raises(ValueError, match=r"labels are on meta, \w+ on cpu"):
        call()
