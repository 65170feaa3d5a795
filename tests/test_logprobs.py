"""token_logprobs / linear_token_logprobs against float64 log_softmax + gather on full logits."""

from __future__ import annotations

import pytest
import torch

import lmloss
import lmloss.fused.logprobs

IGNORE = -100


def _truth(logits: torch.Tensor, labels: torch.Tensor, shift: bool, temperature: float, softcap: float | None):
    """float64, written independently: shift by slicing, mask by multiplication."""
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    if shift:
        z, targets = z[..., :-1, :], labels[..., 1:]
    else:
        targets = labels
    logp = torch.log_softmax(z, -1)
    valid = targets != IGNORE
    lp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    ent = -(logp.exp() * logp).sum(-1) * valid
    if shift:
        pad = torch.zeros(*lp.shape[:-1], 1, dtype=lp.dtype)
        lp, ent = torch.cat([pad, lp], -1), torch.cat([pad, ent], -1)
    return lp, ent


def _problem(shape: tuple[int, ...], v: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = IGNORE
    return logits, labels


@pytest.mark.parametrize("shape", [(2, 5), (1, 1), (3,), (2, 2, 4)])
@pytest.mark.parametrize("v", [7, 33])
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, None), (1.3, 2.5)])
def test_values_and_gradients_match_float64(shape, v, shift, temperature, softcap) -> None:
    logits, labels = _problem(shape, v, seed=v + len(shape))
    lp_true, ent_true = _truth(logits, labels, shift, temperature, softcap)
    x = logits.clone().requires_grad_()
    out = lmloss.token_logprobs(x, labels, shift=shift, temperature=temperature, softcap=softcap, with_entropy=True)
    assert out.logprobs.shape == labels.shape and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs.double(), lp_true, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ent_true, rtol=1e-5, atol=1e-5)
    # Any upstream gradients on both outputs.
    g = torch.Generator().manual_seed(1)
    up_lp, up_ent = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
    (grad,) = torch.autograd.grad((out.logprobs * up_lp).sum() + (out.entropy * up_ent).sum(), x)
    x64 = logits.double().requires_grad_()
    t_lp, t_ent = _truth(x64, labels, shift, temperature, softcap)
    (grad_true,) = torch.autograd.grad((t_lp * up_lp.double()).sum() + (t_ent * up_ent.double()).sum(), x64)
    torch.testing.assert_close(grad.double(), grad_true, rtol=1e-4, atol=1e-5)


def test_entropy_is_none_unless_asked() -> None:
    logits, labels = _problem((2, 4), 5)
    assert lmloss.token_logprobs(logits, labels).entropy is None


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_all_masked_is_zero_finite_with_zero_gradients(backend: str) -> None:
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    weight = torch.randn(6, 4, requires_grad=True)
    labels = torch.full((2, 3), IGNORE)
    out = lmloss.linear_token_logprobs(hidden, weight, labels, with_entropy=True, backend=backend)
    assert torch.equal(out.logprobs, torch.zeros(2, 3)) and torch.equal(out.entropy, torch.zeros(2, 3))
    grads = torch.autograd.grad(out.logprobs.sum() + out.entropy.sum(), (hidden, weight))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_form_matches_float64_logits(with_bias: bool) -> None:
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 6, 8, generator=g, requires_grad=True)
    weight = torch.randn(37, 8, generator=g, requires_grad=True)
    bias = torch.randn(37, generator=g, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 37, (3, 6), generator=g)
    labels[1, 2:] = IGNORE
    out = lmloss.linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=0.9, with_entropy=True)
    params = [p for p in (hidden, weight, bias) if p is not None]
    up = torch.randn(3, 6, generator=g)
    grads = torch.autograd.grad((out.logprobs * up).sum() - out.entropy.sum(), params)
    p64 = [p.detach().double().requires_grad_() for p in params]
    logits = p64[0] @ p64[1].T + (p64[2] if with_bias else 0)
    lp, ent = _truth(logits, labels, True, 0.9, None)
    torch.testing.assert_close(out.logprobs.double(), lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ent, rtol=1e-5, atol=1e-5)
    truth = torch.autograd.grad((lp * up.double()).sum() - ent.sum(), p64)
    for a, b in zip(grads, truth, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_bf16_inputs_give_float32_close_to_truth() -> None:
    logits, labels = _problem((2, 9), 50, dtype=torch.bfloat16)
    out = lmloss.token_logprobs(logits, labels, temperature=0.8, with_entropy=True)
    assert out.logprobs.dtype == torch.float32
    lp, ent = _truth(logits, labels, True, 0.8, None)  # truth on the same bf16 values
    torch.testing.assert_close(out.logprobs.double(), lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ent, rtol=1e-5, atol=1e-5)


def test_temperature_applies_after_the_upcast() -> None:
    """bf16 logits / 0.7 in bf16 would round; the result must equal float32 logits / 0.7."""
    logits, labels = _problem((1, 16), 40, dtype=torch.bfloat16)
    out = lmloss.token_logprobs(logits, labels, temperature=0.7).logprobs
    same = lmloss.token_logprobs(logits.float(), labels, temperature=0.7).logprobs
    assert torch.equal(out, same)


def test_matches_trl_selective_log_softmax_and_entropy() -> None:
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    logits, labels = _problem((3, 6), 21)
    labels = labels.clamp(min=0)
    out = lmloss.token_logprobs(logits, labels, shift=False, with_entropy=True)
    torch.testing.assert_close(out.logprobs, selective_log_softmax(logits, labels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, entropy_from_logits(logits), rtol=1e-5, atol=1e-5)


def test_chunked_backend_matches_the_reference() -> None:
    hidden, weight = torch.randn(2, 5, 4), torch.randn(9, 4)
    labels = torch.randint(0, 9, (2, 5))
    out = lmloss.linear_token_logprobs(hidden, weight, labels, backend="chunked", with_entropy=True, chunk_size=3)
    ref = lmloss.linear_token_logprobs(hidden, weight, labels, backend="reference", with_entropy=True)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"softcap": -1.0}, "softcap"),
        ({"labels": torch.zeros(2, 4, dtype=torch.long)}, "labels has shape"),
        ({"labels": torch.full((2, 5), 9)}, r"labels\[0, 0\] = 9"),
        ({"backend": "triton"}, "backend"),
        ({"weight": torch.randn(9, 3)}, "weight must have shape"),
    ],
)
def test_bad_input_names_the_problem(kwargs: dict, message: str) -> None:
    args = {"hidden": torch.randn(2, 5, 4), "weight": torch.randn(9, 4), "labels": torch.zeros(2, 5, dtype=torch.long)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        lmloss.linear_token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_without_value_checks_the_result_is_the_same() -> None:
    hidden, weight = torch.randn(2, 5, 4), torch.randn(9, 4)
    labels = torch.randint(0, 9, (2, 5))
    with lmloss.validation(False):
        quiet = lmloss.linear_token_logprobs(hidden, weight, labels, with_entropy=True)
    loud = lmloss.linear_token_logprobs(hidden, weight, labels, with_entropy=True)
    assert torch.equal(quiet.logprobs, loud.logprobs) and torch.equal(quiet.entropy, loud.entropy)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_every_backend_refuses_a_softcap_below_the_minimum(backend: str) -> None:
    """The reference backend used to accept softcap=1e-4, which the chunked one refuses."""
    hidden, weight = torch.randn(2, 5, 4), torch.randn(9, 4)
    labels = torch.randint(0, 9, (2, 5))
    with pytest.raises(ValueError, match="below the minimum"):
        lmloss.linear_token_logprobs(hidden, weight, labels, softcap=1e-4, backend=backend)
    with pytest.raises(ValueError, match="below the minimum"):
        lmloss.token_logprobs(hidden @ weight.T, labels, softcap=1e-4)
