"""linear_cross_entropy (every backend) against the reference loss in float64.

The truth is ``causal_lm_loss(hidden @ weight.T + bias, ...)`` computed in float64,
with autograd's own gradients of hidden, weight and bias.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lmloss
from lmloss import causal_lm_loss, linear_cross_entropy
from lmloss.nn import LinearCrossEntropyLoss

OPTION_SETS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"softcap": 4.0},
    {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 2.5},
    {"normalize": "sequence"},
    {"num_items_in_batch": 50},
    {"shift": False},
]


def problem(lead=(2,), seq_len=7, hidden_size=13, vocab=37, *, bias=True, ignore=0.3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, seq_len, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64)
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, vocab, (*lead, seq_len), generator=g)
    labels[torch.rand(labels.shape, generator=g) < ignore] = -100
    tensors = [t.to(dtype).requires_grad_(True) if t is not None else None for t in (hidden, weight, b)]
    return (*tensors, labels)


def truth(hidden, weight, bias, labels, upstream=None, **options):
    """float64 reference loss and autograd gradients of (hidden, weight, bias)."""
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    logits = h @ w.t() + (0 if b is None else b)
    loss = causal_lm_loss(logits, labels, **options)
    return loss.detach(), _grads(loss, (h, w, b), upstream)


def _grads(loss, inputs, upstream):
    scalar = (loss * upstream).sum() if upstream is not None else loss.sum()
    needed = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(scalar, needed))
    return [None if t is None else next(got) for t in inputs]


def check(hidden, weight, bias, labels, *, backend, chunk_size=None, atol=1e-10, **options):
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, backend=backend, chunk_size=chunk_size, **options)
    upstream = torch.randn(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if loss.ndim == 0:
        upstream = upstream.abs() + 0.5  # an upstream scalar that is not 1
    expected_loss, expected_grads = truth(hidden, weight, bias, labels, upstream, **options)
    torch.testing.assert_close(loss.double(), expected_loss, rtol=atol, atol=atol)
    got_grads = _grads(loss.double(), (hidden, weight, bias), upstream)
    for name, got, want in zip(("hidden", "weight", "bias"), got_grads, expected_grads):
        if want is not None:
            assert got.dtype == {"hidden": hidden, "weight": weight, "bias": bias}[name].dtype
            torch.testing.assert_close(
                got.double(), want, rtol=atol, atol=atol, msg=lambda m, where=f"d{name}": f"{where}: {m}"
            )


# --- the grid ------------------------------------------------------------------------


# num_items_in_batch only changes the mean, so it is not paired with the other reductions.
GRID = [(r, o) for r in ("mean", "sum", "none") for o in OPTION_SETS if r == "mean" or "num_items_in_batch" not in o]


@pytest.mark.parametrize("backend", ["chunked", "reference", "auto"])
@pytest.mark.parametrize("reduction, options", GRID, ids=lambda v: v if isinstance(v, str) else ",".join(v) or "plain")
def test_matches_reference_in_float64(backend, reduction, options):
    hidden, weight, bias, labels = problem()
    check(hidden, weight, bias, labels, backend=backend, chunk_size=3, reduction=reduction, **options)


TOKEN_LOSSES = [
    {"token_loss": "dft"},
    {"token_loss": "focal"},
    {"token_loss": "focal", "focal_gamma": 0.5},
    {"token_loss": "focal_attached", "focal_gamma": 1.5},
    {"token_loss": "focal_attached", "focal_gamma": 0.5},
]
TOKEN_LOSS_OPTIONS = [
    {},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 2.5},
    {"normalize": "sequence", "shift": False},
]


# The reference backend only forwards the options: one option set is enough for it.
TOKEN_LOSS_GRID = [
    (backend, options)
    for options in TOKEN_LOSS_OPTIONS
    for backend in ("chunked", "reference")
    if backend == "chunked" or options is TOKEN_LOSS_OPTIONS[1]
]


@pytest.mark.parametrize("token_loss", TOKEN_LOSSES, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "backend, options", TOKEN_LOSS_GRID, ids=lambda v: v if isinstance(v, str) else ",".join(v) or "plain"
)
def test_token_losses_match_reference_in_float64(backend, token_loss, reduction, options):
    """DFT/focal weights are made in the chunk from its log-sum-exp and folded into the gradient."""
    hidden, weight, bias, labels = problem(seed=4)
    with torch.no_grad():
        hidden.mul_(2.0)  # sharper distributions: weights spread over (0, 1)
    check(hidden, weight, bias, labels, backend=backend, chunk_size=3, reduction=reduction, **token_loss, **options)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_token_losses_with_token_weights_and_static_shapes(reduction):
    hidden, weight, bias, labels = problem(seq_len=9, ignore=0.4, seed=6)
    weights = torch.rand(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for options in ({"token_loss": "dft"}, {"token_loss": "focal_attached", "focal_gamma": 2.0}):
        check(
            hidden,
            weight,
            bias,
            labels,
            backend="chunked",
            chunk_size=4,
            reduction=reduction,
            token_weights=weights,
            num_items_in_batch=30,
            **options,
        )
        with lmloss.validation(False):  # ignored rows masked instead of dropped
            check(
                hidden,
                weight,
                bias,
                labels,
                backend="chunked",
                chunk_size=4,
                reduction=reduction,
                label_smoothing=0.1,
                **options,
            )


def test_token_loss_all_ignored_gives_zero_gradients():
    hidden, weight, bias, labels = problem(ignore=1.0)
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, backend="chunked", token_loss="focal_attached")
    loss.backward()
    assert float(loss.detach()) == 0.0 and loss.grad_fn is not None
    assert all(bool((t.grad == 0).all()) for t in (hidden, weight, bias))


@pytest.mark.parametrize(
    "shape",
    [
        dict(lead=(), seq_len=1),  # T=1: nothing to score with shift
        dict(lead=(3,), seq_len=1),
        dict(lead=(), seq_len=11, vocab=2),  # 2-D hidden [T, D], tiny vocabulary
        dict(lead=(2, 3), seq_len=4, hidden_size=1, vocab=101),  # 4-D hidden, odd D and V
        dict(lead=(1,), seq_len=17, hidden_size=33, vocab=257),
    ],
    ids=["T1", "batch-T1", "2d-V2", "4d-D1", "V257"],
)
@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_odd_shapes(shape, chunk_size, reduction):
    hidden, weight, bias, labels = problem(**shape)
    check(hidden, weight, bias, labels, backend="chunked", chunk_size=chunk_size, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_without_bias_and_with_token_weights(reduction):
    hidden, weight, _, labels = problem(bias=False)
    weights = torch.rand(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    check(hidden, weight, None, labels, backend="chunked", chunk_size=2, reduction=reduction, token_weights=weights)
    mask = weights > 0.5
    check(
        hidden,
        weight,
        None,
        labels,
        backend="chunked",
        chunk_size=5,
        reduction=reduction,
        token_weights=mask,
        normalize="sequence",
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_finite_zero_and_zero_gradients(reduction):
    hidden, weight, bias, labels = problem(ignore=1.0)
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, backend="chunked", reduction=reduction)
    assert loss.grad_fn is not None and bool((loss == 0).all()) and torch.isfinite(loss).all()
    loss.sum().backward()
    for t in (hidden, weight, bias):
        # Zeros, not None: under DDP every parameter must receive a gradient.
        assert t.grad is not None and bool((t.grad == 0).all())


def test_static_shapes_when_value_checks_are_off():
    """validation(False): ignored rows are masked instead of dropped, same result."""
    hidden, weight, bias, labels = problem(seq_len=9, ignore=0.5)
    with lmloss.validation(False):
        check(hidden, weight, bias, labels, backend="chunked", chunk_size=4, label_smoothing=0.1, z_loss=1e-3)
        check(hidden, weight, bias, labels, backend="chunked", chunk_size=4, reduction="none", softcap=3.0)


# --- low precision: error no worse than the naive same-dtype path ----------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 10.0}])
def test_low_precision_error_is_no_worse_than_naive(dtype, options):
    hidden, weight, bias, labels = problem(
        lead=(4,), seq_len=64, hidden_size=64, vocab=1000, ignore=0.2, seed=5, dtype=dtype
    )
    with torch.no_grad():
        weight.mul_(0.125)
    loss64, grads64 = truth(hidden, weight, bias, labels, **options)

    def error(loss):
        got = _grads(loss, (hidden, weight, bias), None)
        return [abs(float(loss.detach()) - float(loss64)) / float(loss64)] + [
            float((g.double() - w).norm() / w.norm()) for g, w in zip(got, grads64)
        ]

    # The naive path: logits in the input dtype, the loss in float32 (what transformers does).
    naive = error(causal_lm_loss(hidden @ weight.t() + bias, labels, **options))
    ours = error(linear_cross_entropy(hidden, weight, labels, bias=bias, backend="chunked", chunk_size=50, **options))
    eps = torch.finfo(dtype).eps
    for name, n, o in zip(("loss", "hidden", "weight", "bias"), naive, ours):
        assert o <= 1.25 * n + 4 * eps, f"{name}: lmloss error {o:.2e} vs naive {n:.2e}"


# --- autograd behaviour ------------------------------------------------------------------


def test_frozen_weight_and_no_grad():
    hidden, weight, _, labels = problem(bias=False)
    weight.requires_grad_(False)  # e.g. LoRA: the lm_head is frozen
    linear_cross_entropy(hidden, weight, labels, backend="chunked").backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, backend="chunked")
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, truth(hidden, weight, None, labels)[0])


def test_second_backward_is_refused_not_wrong():
    hidden, weight, bias, labels = problem()
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, backend="chunked")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward was called twice"):
        loss.backward()


def test_reduction_none_supports_a_second_backward():
    hidden, weight, bias, labels = problem()
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, backend="chunked", reduction="none")
    loss.sum().backward(retain_graph=True)
    first = hidden.grad.clone()
    loss.sum().backward()
    torch.testing.assert_close(hidden.grad, 2 * first)


def test_module_form_equals_function():
    hidden, weight, bias, labels = problem()
    module = LinearCrossEntropyLoss(label_smoothing=0.1, backend="chunked", chunk_size=2)
    torch.testing.assert_close(
        module(hidden, weight, labels, bias=bias),
        linear_cross_entropy(hidden, weight, labels, bias=bias, label_smoothing=0.1),
    )
    assert "chunk_size=2" in repr(module)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h, w, b, y: (h, w[:, :-1], b, y), "weight must have shape"),
        (lambda h, w, b, y: (h, w.float(), b, y), "must have the same dtype"),
        (lambda h, w, b, y: (h, w, b[:-1], y), "bias must have shape"),
        (lambda h, w, b, y: (h, w, b, y[:, :-1]), "labels has shape"),
        (lambda h, w, b, y: (h.long(), w, b, y), "hidden must be a floating-point"),
        (lambda h, w, b, y: (h[0, 0], w, b, y[0, 0]), "at least 2-D"),
        (lambda h, w, b, y: (h, w, b, y.masked_fill(y == -100, 37)), r"is outside the vocabulary \[0, 37\)"),
    ],
)
def test_bad_input(change, message):
    hidden, weight, bias, labels = problem()
    h, w, b, y = change(hidden.detach(), weight.detach(), bias.detach(), labels)
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(h, w, y, bias=b, backend="chunked")


def test_bad_options():
    hidden, weight, _, labels = problem()
    with pytest.raises(ValueError, match="backend='triton-fast' is not supported"):
        linear_cross_entropy(hidden, weight, labels, backend="triton-fast")  # type: ignore[arg-type]  # on purpose
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        linear_cross_entropy(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="reduction='avg'"):
        LinearCrossEntropyLoss(reduction="avg")  # type: ignore[arg-type]  # on purpose
    with pytest.raises(ValueError, match=r"focal_gamma=3\.0 is only used with"):
        linear_cross_entropy(hidden, weight, labels, backend="chunked", focal_gamma=3.0)
    with pytest.raises(ValueError, match="token_loss='poly' is not supported"):
        linear_cross_entropy(hidden, weight, labels, token_loss="poly")  # type: ignore[arg-type]  # on purpose


# --- property test -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    lead=st.sampled_from([(), (1,), (3,)]),
    seq_len=st.integers(1, 9),
    hidden_size=st.integers(1, 9),
    vocab=st.integers(2, 70),
    chunk=st.integers(1, 12),
    ignore=st.sampled_from([0.0, 0.5, 1.0]),
    options=st.sampled_from(list(itertools.product(["mean", "sum", "none"], OPTION_SETS[:6]))),
    token_loss=st.sampled_from([{}, *TOKEN_LOSSES]),
    seed=st.integers(0, 10_000),
)
def test_property_matches_reference(lead, seq_len, hidden_size, vocab, chunk, ignore, options, token_loss, seed):
    reduction, extra = options
    hidden, weight, bias, labels = problem(lead, seq_len, hidden_size, vocab, ignore=ignore, seed=seed)
    check(hidden, weight, bias, labels, backend="chunked", chunk_size=chunk, reduction=reduction, **extra, **token_loss)


# --- review fixes --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_autocast_casts_inputs_like_linear_would(backend):
    hidden, weight, bias, labels = problem(seq_len=9, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias, backend=backend)
    expected = linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels, bias=bias.bfloat16(), backend=backend)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_token_weights_get_no_gradient(backend):
    hidden, weight, bias, labels = problem()
    weights = torch.rand(labels.shape, dtype=torch.float64, requires_grad=True)
    linear_cross_entropy(hidden, weight, labels, bias=bias, token_weights=weights, backend=backend).backward()
    assert weights.grad is None


def test_empty_sequence():
    hidden, weight, bias, labels = problem(seq_len=0)
    assert linear_cross_entropy(hidden, weight, labels, backend="chunked", reduction="none").shape == (2, 0)
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, backend="chunked")
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((weight.grad == 0).all())


def test_no_gradient_work_without_grad():
    """Evaluation: only the logits products run, no gradient products."""
    from test_chunked import RecordOutputs

    hidden, weight, _, labels = problem(seq_len=16, bias=False)
    # 2 rows x 15 targets = 30 scored positions: 8 chunks of at most 4 rows. With a
    # gradient, each chunk adds dz @ W (mm) to its logits product (and dW's addmm_).
    for grad_enabled, products in ((False, 8), (True, 16)):
        recorder = RecordOutputs()
        with torch.set_grad_enabled(grad_enabled), recorder:
            linear_cross_entropy(hidden, weight, labels.clamp(min=0), backend="chunked", chunk_size=4)
        per_chunk = [shape for shape in recorder.products if shape[0] <= 4]  # not dW's [V, rows] product
        assert len(per_chunk) == products, recorder.products


def test_weight_changed_in_place_before_backward_is_refused():
    hidden, weight, bias, labels = problem()
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, backend="chunked")
    with torch.no_grad():
        weight.add_(1.0)  # e.g. optimizer.step() before loss.backward()
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        loss.backward()
