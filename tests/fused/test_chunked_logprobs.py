"""The chunked backend of linear_token_logprobs (fused.logprobs) against float64 log_softmax on
materialized logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmloss import linear_token_logprobs, validation


def chunked_token_logprobs(*args, **kwargs):
    """``linear_token_logprobs`` on its chunked backend, whatever the sizes."""
    return linear_token_logprobs(*args, backend="chunked", **kwargs)


def _problem(dtype=torch.float64, lead=(2,), seq_len=7, hidden_size=6, vocab=37, seed=0, ignored=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, seq_len, hidden_size, generator=g, dtype=torch.float64).to(dtype)
    weight = (2 * torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64)).to(dtype)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, vocab, (*lead, seq_len), generator=g)
    labels[torch.rand(labels.shape, generator=g) < ignored] = -100
    return [t.requires_grad_() for t in (hidden, weight, bias)], labels, g


def truth(hidden, weight, bias, labels, *, shift, temperature, softcap):
    """float64 log-probabilities and entropies from the whole logits, aligned with labels."""
    z = F.linear(hidden.double(), weight.double(), bias.double())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z / temperature, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    if shift:
        log_p, entropy, y = log_p[..., :-1, :], entropy[..., :-1], labels[..., 1:]
    else:
        y = labels
    keep = y != -100
    lp = log_p.gather(-1, torch.where(keep, y, 0).unsqueeze(-1)).squeeze(-1) * keep
    ent = entropy * keep
    if shift:
        lp, ent = F.pad(lp, (1, 0)), F.pad(ent, (1, 0))
    return lp, ent


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7), dict(softcap=3.0, temperature=1.3)])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_values_and_gradients_of_both_outputs_match_float64(shift, options, chunk_size):
    (hidden, weight, bias), labels, g = _problem()
    lp, ent = chunked_token_logprobs(
        hidden, weight, labels, bias=bias, shift=shift, with_entropy=True, chunk_size=chunk_size, **options
    )
    kw = dict(shift=shift, temperature=options.get("temperature", 1.0), softcap=options.get("softcap"))
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    want_lp, want_ent = truth(*leaves, labels, **kw)
    torch.testing.assert_close(lp, want_lp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ent, want_ent, rtol=1e-10, atol=1e-12)
    up_lp, up_ent = (
        torch.randn(lp.shape, generator=g, dtype=torch.float64),
        torch.randn(lp.shape, generator=g, dtype=torch.float64),
    )
    got = torch.autograd.grad((lp * up_lp).sum() + (ent * up_ent).sum(), (hidden, weight, bias))
    want = torch.autograd.grad((want_lp * up_lp).sum() + (want_ent * up_ent).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_logprobs_alone_and_float32():
    (hidden, weight, bias), labels, g = _problem(dtype=torch.float32, lead=(3,), seq_len=5, vocab=50)
    lp, ent = chunked_token_logprobs(hidden, weight, labels, bias=bias, chunk_size=4)
    assert ent is None and lp.dtype == torch.float32 and lp.shape == labels.shape
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    want_lp, _ = truth(*leaves, labels, shift=True, temperature=1.0, softcap=None)
    torch.testing.assert_close(lp.double(), want_lp, rtol=1e-5, atol=1e-5)
    up = torch.randn(lp.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((lp.double() * up).sum(), (hidden, weight, bias))
    want = torch.autograd.grad((want_lp * up).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_nothing_scored_gives_exact_zeros_and_zero_gradients():
    (hidden, weight, bias), labels, _ = _problem(ignored=1.0)
    lp, ent = chunked_token_logprobs(hidden, weight, labels, bias=bias, with_entropy=True)
    assert bool((lp == 0).all()) and bool((ent == 0).all())
    (lp.sum() + ent.sum()).backward()
    assert bool((hidden.grad == 0).all()) and bool((weight.grad == 0).all()) and bool((bias.grad == 0).all())


def test_static_shapes_match_and_unscored_nan_rows_stay_out():
    (hidden, weight, bias), labels, _ = _problem()
    labels[0, 3] = -100
    with torch.no_grad():
        hidden[0, 2] = float("nan")  # predicts labels[0, 3]: unscored
    for checks in (True, False):
        with validation(checks):
            lp, ent = chunked_token_logprobs(hidden, weight, labels, bias=bias, with_entropy=True, chunk_size=2)
        weight.grad = None
        (lp.sum() + ent.sum()).backward()
        assert bool(lp.isfinite().all()) and bool(weight.grad.isfinite().all()), checks


def test_bad_options_and_double_backward_are_refused():
    (hidden, weight, _), labels, _ = _problem()
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        chunked_token_logprobs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="softcap"):
        chunked_token_logprobs(hidden, weight, labels, softcap=1e-300)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        chunked_token_logprobs(hidden, weight, torch.full_like(labels, 99))
    lp, _ = chunked_token_logprobs(hidden, weight, labels)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(lp.sum(), hidden, create_graph=True)
