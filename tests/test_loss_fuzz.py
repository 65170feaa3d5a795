"""Issue 12, item 8: fuzz tests of the loss entry points against a float64 truth.

``causal_lm_loss`` and ``linear_cross_entropy`` (backends reference, auto and chunked;
class weights too, written out as ``F.cross_entropy(weight=...)`` defines them;
the Triton backends have their own interpreter tests in tests/fused/test_triton.py)
over odd shapes (T = 1, vocabularies that are not powers of two, all-ignored rows),
dtypes (float32, bfloat16, float64), label dtypes and every per-token option. The
truth below is the contract written out in float64 with PyTorch's log_softmax, on the
whole tensor; drawn invalid options must raise the documented ``ValueError``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmloss import causal_lm_loss, linear_cross_entropy

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOKEN_LOSSES = [
    ("ce", None),
    ("dft", None),
    ("focal", 0.5),
    ("focal", 2.0),
    ("focal_attached", 1.0),
    ("focal_attached", 2.0),
]
# (name, value) of an invalid option, with the words of its error; None: all valid.
BAD = [
    None,
    None,
    None,
    None,
    ("ignore_index", 2**32 - 1, "does not fit the labels' dtype"),
    ("softcap", 1e-9, "below the minimum"),
]


def truth(z: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, o: dict) -> torch.Tensor:
    """The loss of float64 logits ``z`` ``[..., T, V]`` as the contract defines it."""
    if o["softcap"] is not None:
        z = o["softcap"] * torch.tanh(z / o["softcap"])
    w = torch.ones(labels.shape, dtype=torch.float64) if weights is None else weights.double()
    y = labels.long()
    if o["shift"]:
        z, y, w = z[..., :-1, :], y[..., 1:], w[..., 1:]
    valid = y != o["ignore_index"]
    log_p = torch.log_softmax(z, dim=-1)
    nll = -log_p.gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
    e = o["label_smoothing"]
    u = o["class_weights"]
    u = torch.ones(z.shape[-1], dtype=torch.float64) if u is None else u.double()
    u_y = u[torch.where(valid, y, 0)]
    # torch's weight=: (1-e) u_y (-log p_y) + e/V sum_j u_j (-log p_j); the mean counts u_y.
    ce = (1 - e) * u_y * nll + e * -(log_p * u).sum(dim=-1) / z.shape[-1]
    p = torch.exp(-nll)
    gamma = 2.0 if o["focal_gamma"] is None else o["focal_gamma"]
    factor = {
        "ce": torch.ones_like(p),
        "dft": p.detach(),
        "focal": (1 - p).detach() ** gamma,
        "focal_attached": (1 - p) ** gamma,
    }[o["token_loss"]]
    per = ce * factor + o["z_loss"] * u_y * torch.logsumexp(z, dim=-1) ** 2
    w = w * valid
    per = torch.where(w > 0, per * w, torch.zeros_like(per))
    w = w * u_y
    if o["normalize"] == "sequence":
        rows = w.sum(-1, keepdim=True)
        per = torch.where(rows > 0, per / torch.where(rows > 0, rows, 1.0), 0.0)
        items = (rows > 0).sum().double()
    else:
        items = w.sum()
    if o["reduction"] == "none":
        return torch.nn.functional.pad(per, (1, 0)) if o["shift"] else per
    if o["reduction"] == "sum":
        return per.sum()
    divisor = items if o["num_items_in_batch"] is None else torch.tensor(o["num_items_in_batch"], dtype=torch.float64)
    return per.sum() / divisor if divisor > 0 else per.sum() * 0.0


@st.composite
def problems(draw):
    lead = draw(st.sampled_from([(), (1,), (3,)]))
    seq_len, vocab = draw(st.integers(1, 7)), draw(st.integers(2, 37))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    label_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    labels = torch.randint(0, vocab, (*lead, seq_len), generator=g)
    ignored = torch.rand(labels.shape, generator=g) < draw(st.sampled_from([0.0, 0.4, 1.0]))
    ignore_index = draw(st.sampled_from([-100, 2**31 - 1]))
    labels = labels.masked_fill(ignored, ignore_index).to(label_dtype)
    token_loss, gamma = draw(st.sampled_from(TOKEN_LOSSES))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    options = dict(
        shift=draw(st.booleans()),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        z_loss=draw(st.sampled_from([0.0, 1e-2])),
        softcap=draw(st.sampled_from([None, 2.0, 30.0])),
        normalize=draw(st.sampled_from(["token", "sequence"])),
        token_loss=token_loss,
        focal_gamma=gamma,
        num_items_in_batch=draw(st.sampled_from([None, 5.0])) if reduction == "mean" else None,
        class_weights=draw(st.sampled_from([None, "rand", "some zero"])),
    )
    if options["class_weights"] is not None:
        u = torch.rand(vocab, generator=g, dtype=torch.float64) * 2
        options["class_weights"] = (
            u.masked_fill(torch.rand(vocab, generator=g) < 0.5, 0.0) if options["class_weights"] == "some zero" else u
        )
    weights = torch.rand(labels.shape, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    bad = draw(st.sampled_from(BAD))
    if bad is not None and (bad[0] != "ignore_index" or label_dtype == torch.int32):
        options[bad[0]] = bad[1]
    else:
        bad = None
    return dict(
        lead=lead,
        seq_len=seq_len,
        vocab=vocab,
        g=g,
        labels=labels,
        weights=weights,
        options=options,
        bad=bad,
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64])),
    )


def _tolerance(dtype: torch.dtype) -> dict:
    return {
        torch.float64: dict(rtol=1e-9, atol=1e-10),
        torch.float32: dict(rtol=2e-4, atol=2e-5),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
    }[dtype]


def _upstream(loss: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return (
        torch.rand(loss.shape, generator=g, dtype=torch.float64) if loss.ndim else torch.ones((), dtype=torch.float64)
    )


@FUZZ
@given(case=problems())
def test_causal_lm_loss_matches_float64_truth(case):
    labels, weights, o, dtype = case["labels"], case["weights"], case["options"], case["dtype"]
    logits = (3 * torch.randn(*labels.shape, case["vocab"], generator=case["g"])).to(dtype).requires_grad_()
    if case["bad"] is not None:
        with pytest.raises(ValueError, match=case["bad"][2]):
            causal_lm_loss(logits, labels, token_weights=weights, **o)
        return
    got = causal_lm_loss(logits, labels, token_weights=weights, **o)
    # bf16 logits are exact in float64: the truth sees the very numbers the loss saw.
    z = logits.detach().double().requires_grad_()
    want = truth(z, labels, weights, o)
    tol = _tolerance(dtype if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    up = _upstream(want, case["g"])
    (g_got,) = torch.autograd.grad((got.double() * up).sum(), logits)
    (g_want,) = torch.autograd.grad((want * up).sum(), z)
    torch.testing.assert_close(g_got.double(), g_want, **_tolerance(dtype))


@FUZZ
@given(
    case=problems(),
    backend=st.sampled_from(["reference", "auto", "chunked"]),
    hidden_size=st.integers(1, 6),
    chunk_size=st.sampled_from([None, 1, 2, 5]),
)
def test_linear_cross_entropy_matches_float64_truth(case, backend, hidden_size, chunk_size):
    labels, weights, o, dtype, g = case["labels"], case["weights"], case["options"], case["dtype"], case["g"]
    hidden = torch.randn(*labels.shape, hidden_size, generator=g).to(dtype).requires_grad_()
    weight = (2 * torch.randn(case["vocab"], hidden_size, generator=g)).to(dtype).requires_grad_()
    run = dict(token_weights=weights, backend=backend, chunk_size=chunk_size, **o)
    if case["bad"] is not None:
        with pytest.raises(ValueError, match=case["bad"][2]):
            linear_cross_entropy(hidden, weight, labels, **run)
        return
    got = linear_cross_entropy(hidden, weight, labels, **run)
    h, w = (t.detach().double().requires_grad_() for t in (hidden, weight))
    if dtype == torch.bfloat16:
        # The products run in bf16 (as F.linear would): the truth takes those logits.
        z = (hidden.detach() @ weight.detach().T).double().requires_grad_()
        want = truth(z, labels, weights, o)
        torch.testing.assert_close(got.double(), want.detach(), **_tolerance(dtype))
        return
    want = truth(h @ w.T, labels, weights, o)
    torch.testing.assert_close(got.double(), want.detach(), **_tolerance(dtype))
    up = _upstream(want, g)
    got_grads = torch.autograd.grad((got.double() * up).sum(), (hidden, weight))
    want_grads = torch.autograd.grad((want * up).sum(), (h, w))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.double(), b, **_tolerance(dtype))
