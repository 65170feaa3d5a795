"""The Triton backends' host side of the row math: the kernels' gradient coefficients.

The kernels apply ``(a0 + a1 L) softmax - b onehot - c u``; ``grad_coefficients``
derives the coefficients from the engine's row math. Here (no kernel runs) the form is
checked against the engine's own ``logits_grad_`` in float64; the kernels themselves
are checked end to end against the reference in ``test_triton.py``.
"""

from __future__ import annotations

import pytest
import torch

from lmloss._engine.rowmath import LossMath, logits_grad_, token_terms
from lmloss.fused.triton_launch import grad_coefficients, row_classes

ROW_MATHS = [
    LossMath(),
    LossMath(label_smoothing=0.1, z_loss=1e-2),
    LossMath(token_loss="dft", label_smoothing=0.2, z_loss=1e-3),
    LossMath(token_loss="focal", focal_gamma=2.0, z_loss=1e-2),
    LossMath(token_loss="focal_attached", focal_gamma=2.0, label_smoothing=0.1, z_loss=1e-2),
    LossMath(token_loss="focal_attached", focal_gamma=0.5, label_smoothing=0.1),
]


@pytest.mark.parametrize("classes", [False, True])
@pytest.mark.parametrize("math", ROW_MATHS, ids=lambda m: f"{m.token_loss}-e{m.label_smoothing}-c{m.z_loss}")
def test_grad_coefficients_reproduce_the_engine_gradient(math, classes):
    """The kernels' gradient ``(a0 + a1 L) softmax - b onehot - c u`` with the host's
    coefficients equals the engine's ``logits_grad_`` (float64, rows with ``p = 1``, zero
    and negative factors included, with and without class weights ``u``), so both
    backends' kernels apply the one row math."""
    g = torch.Generator().manual_seed(3)
    rows, vocab = 6, 11
    z = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, vocab, (rows,), generator=g)
    z[0, y[0]] = 1e3  # p = 1 exactly: the attached weight's limit
    factor = torch.randn(rows, generator=g, dtype=torch.float64)
    factor[1] = 0.0
    lse = torch.logsumexp(z, dim=1)
    nll = lse - z.gather(1, y[:, None]).squeeze(1)
    u = torch.ones(vocab, dtype=torch.float64)
    if classes:
        u = torch.rand(vocab, generator=g, dtype=torch.float64) * 2
        u[y[2]] = 0.0  # a target whose class weighs nothing
    rows = row_classes(u if classes else None, y)
    terms = token_terms(lse, nll, z @ u, math, vocab, rows)
    want = logits_grad_(torch.softmax(z, dim=1), y, factor, lse, terms, math, vocab, classes=rows)
    a0, a1, b, c = grad_coefficients(factor, terms.w, terms.k, math, vocab, rows).double()
    onehot = torch.nn.functional.one_hot(y, vocab).double()
    kernels_form = (a0 + a1 * lse)[:, None] * torch.softmax(z, dim=1) - b[:, None] * onehot - c[:, None] * u
    assert torch.isfinite(kernels_form).all()
    # The coefficients are float32 (what the kernels read): float32 rounding, not more.
    torch.testing.assert_close(kernels_form, want, rtol=1e-6, atol=1e-7)
