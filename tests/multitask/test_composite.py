"""CompositeLoss: hand-weighted sums, gradients per term, logging, curricula, bad input."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch

import lmloss
from lmloss.multitask import CompositeLoss, GradNorm, LinearSchedule, StepSchedule, UncertaintyWeighting


class Outputs:
    """Three independent leaves, so each term's gradient is checked separately."""

    def __init__(self, dtype=torch.float32):
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(5, generator=g).to(dtype).requires_grad_(True)
        self.b = torch.randn(5, generator=g).to(dtype).requires_grad_(True)
        self.c = torch.randn(5, generator=g).to(dtype).requires_grad_(True)


def text_term(batch, outputs):
    return (outputs.a**2).sum()


class BoxTerm:
    """A term as an object with __call__ (no base class)."""

    def __call__(self, batch, outputs):
        return (outputs.b - batch["target"]).abs().mean()


class AuxTerm(torch.nn.Module):
    """A term with its own parameter: registered, so the composite's parameters include it."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, batch, outputs):
        return self.scale * outputs.c.sum()


BATCH = {"target": torch.linspace(-1.0, 1.0, 5)}


def test_total_is_the_hand_weighted_sum_and_gradients_reach_every_term():
    aux = AuxTerm()
    loss_fn = CompositeLoss({"text": text_term, "box": BoxTerm()}, weights={"box": 2.0}).add("aux", aux, weight=0.5)
    assert loss_fn.names == ("text", "box", "aux")
    assert any(p is aux.scale for p in loss_fn.parameters())
    out = Outputs()
    result = loss_fn(BATCH, out)

    # The truth, computed directly in float64 from the same leaves.
    a, b, c = (t.detach().double() for t in (out.a, out.b, out.c))
    text, box, aux_value = (a**2).sum(), (b - BATCH["target"].double()).abs().mean(), 2.0 * c.sum()
    expected = text + 2.0 * box + 0.5 * aux_value
    assert result.total.dtype == torch.float32 and result.total.shape == ()
    assert result.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert result.terms["box"].item() == pytest.approx(box.item(), rel=1e-6)

    result.total.backward()
    torch.testing.assert_close(out.a.grad, 2 * out.a.detach())
    torch.testing.assert_close(out.b.grad, 2.0 * torch.sign(out.b.detach() - BATCH["target"]) / 5)
    torch.testing.assert_close(out.c.grad, torch.full((5,), 0.5 * 2.0))
    assert aux.scale.grad.item() == pytest.approx(0.5 * c.sum().item(), rel=1e-6)


def test_log_names_every_term_and_weight():
    result = CompositeLoss({"text": text_term, "box": BoxTerm()}, weights={"box": 0.25})(BATCH, Outputs())
    logged = result.log(prefix="train/")
    keys = {"train/loss/total", "train/loss/text", "train/loss/box", "train/weight/text", "train/weight/box"}
    assert set(logged) == keys
    assert logged["train/weight/box"] == 0.25 and logged["train/weight/text"] == 1.0
    assert logged["train/loss/text"] == pytest.approx(result.terms["text"].item())
    assert logged["train/loss/total"] == pytest.approx(logged["train/loss/text"] + 0.25 * logged["train/loss/box"])
    assert all(not w.requires_grad for w in result.weights.values())


def test_low_precision_terms_are_summed_in_float32():
    # 256 + 1 is not a bfloat16 (8-bit significand: it rounds to 256); in float32 it is 257.
    big = torch.tensor(256.0, dtype=torch.bfloat16, requires_grad=True)
    one = torch.tensor(1.0, dtype=torch.bfloat16, requires_grad=True)
    assert (big + one).item() == 256.0
    result = CompositeLoss({"big": lambda b, o: big * 1, "one": lambda b, o: one * 1})(None, None)
    assert result.total.dtype == torch.float32 and result.terms["big"].dtype == torch.float32
    assert result.total.item() == 257.0
    result.total.backward()
    assert big.grad.dtype == torch.bfloat16 and (big.grad.item(), one.grad.item()) == (1.0, 1.0)


def test_scheduled_weights_follow_the_step():
    ramp = LinearSchedule(0.0, 2.0, 10, 20)
    loss_fn = CompositeLoss({"text": text_term, "box": BoxTerm()}, weights={"box": ramp})
    out = Outputs()
    text, box = text_term(BATCH, out).item(), BoxTerm()(BATCH, out).item()
    for step, weight in ((0, 0.0), (10, 0.0), (15, 1.0), (20, 2.0), (99, 2.0)):
        result = loss_fn(BATCH, out, step=step)
        assert result.weights["box"].item() == weight and result.step == step
        assert result.total.item() == pytest.approx(text + weight * box, rel=1e-6)
    assert ramp.current_step == 99 and loss_fn.current_step == 99
    with pytest.raises(ValueError, match=r"term\(s\) \['box'\] have scheduled weights: pass step="):
        loss_fn(BATCH, out)


def test_learned_strategy_composes_with_a_curriculum_weight():
    strategy = UncertaintyWeighting(["text", "box"], init_log_var=0.4)
    loss_fn = CompositeLoss(
        {"text": text_term, "box": BoxTerm()}, weights={"box": StepSchedule([(0, 0.5), (5, 3.0)])}, weighting=strategy
    )
    assert [n for n, _ in loss_fn.named_parameters()] == ["weighting.log_vars"]
    out = Outputs()
    text, box = text_term(BATCH, out).item(), BoxTerm()(BATCH, out).item()
    result = loss_fn(BATCH, out, step=7)
    # The curriculum scales the term, then the strategy weighs it: 0.5 e^-s (3 L) + 0.5 s per term.
    s = 0.4
    expected = 0.5 * math.exp(-s) * text + 0.5 * s + 0.5 * math.exp(-s) * 3.0 * box + 0.5 * s
    assert result.total.item() == pytest.approx(expected, rel=1e-6)
    assert result.weights["box"].item() == pytest.approx(3.0 * 0.5 * math.exp(-s), rel=1e-6)


def test_gradnorm_through_the_composite():
    shared = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    terms = {"t1": lambda b, o: (shared**2).sum(), "t2": lambda b, o: 3.0 * shared.sum().abs()}
    gradnorm = GradNorm(["t1", "t2"], shared, initial_losses={"t1": 5.0, "t2": 3.0})
    loss_fn = CompositeLoss(terms, weighting=gradnorm)
    result = loss_fn(None, None)
    gradnorm.update(result.terms, lr=0.1)
    result.total.backward()
    # ||dL1/dW|| = ||2W|| = 2 sqrt(5); ||dL2/dW|| = ||3 sign(sum W)|| = 3 sqrt(2); r = 1 (L = L(0)).
    g = torch.tensor([2 * math.sqrt(5), 3 * math.sqrt(2)])
    target = g.mean()
    grad = torch.sign(g - target) * g  # d/dw_i |w_i g_i - target| at w = 1
    stepped = torch.ones(2) - 0.1 * grad
    torch.testing.assert_close(gradnorm.weights.detach(), 2 * stepped / stepped.sum())
    torch.testing.assert_close(shared.grad, 2 * shared.detach() + 3.0 * torch.sign(shared.detach().sum()))


def test_nonfinite_terms_raise_or_are_skipped():
    terms = {"text": text_term, "bad": lambda b, o: o.b.sum() * float("nan")}
    with pytest.raises(ValueError, match=r"loss term\(s\) \['bad'\] are not finite"):
        CompositeLoss(terms)(BATCH, Outputs())
    out = Outputs()
    with pytest.warns(UserWarning, match="skipping non-finite term"):
        result = CompositeLoss(terms, on_nonfinite="skip")(BATCH, out)
    assert result.skipped == ("bad",) and set(result.terms) == {"text"}
    assert result.total.item() == pytest.approx(text_term(BATCH, out).item())
    logged = result.log()
    assert math.isnan(logged["loss/bad"]) and logged["weight/bad"] == 0.0
    result.total.backward()
    assert torch.isfinite(out.a.grad).all() and out.b.grad is None  # the NaN never reaches a gradient
    with pytest.raises(ValueError, match="every loss term is non-finite"):
        CompositeLoss({"bad": terms["bad"]}, on_nonfinite="skip")(BATCH, Outputs())
    with lmloss.validation(False):  # value checks off: no sync, no check
        assert math.isnan(CompositeLoss(terms)(BATCH, Outputs()).total.item())


def test_checkpoint_round_trip_through_torch_save():
    def build():
        return CompositeLoss({"text": text_term, "box": BoxTerm()}, weighting=UncertaintyWeighting(["text", "box"]))

    original = build()
    original.set_weight("box", LinearSchedule(0.1, 0.9, 0, 8))
    with torch.no_grad():
        original.weighting.log_vars.copy_(torch.tensor([0.2, -0.3]))
    out = Outputs()
    original(BATCH, out, step=3)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = build()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert isinstance(restored.weight("box"), LinearSchedule) and restored.current_step == 3
    for step in (0, 3, 5, 8):
        torch.testing.assert_close(restored(BATCH, out, step=step).total, original(BATCH, out, step=step).total)
    other_terms = CompositeLoss({"text": text_term}, weighting=UncertaintyWeighting(["text", "box"]))
    with pytest.raises(ValueError, match="the state has terms"):
        other_terms.load_state_dict(original.state_dict())


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match="no terms; add one"):
        CompositeLoss()(BATCH, Outputs())
    with pytest.raises(ValueError, match=r"unknown term name 'nope'; terms are \['text'\]"):
        CompositeLoss({"text": text_term}).set_weight("nope", 1.0)
    with pytest.raises(ValueError, match=r"weights given for unknown term name\(s\) \['nope'\]"):
        CompositeLoss({"text": text_term}, weights={"nope": 1.0})
    with pytest.raises(ValueError, match=re.escape("weight of term 'text' must be >= 0, got -1.0")):
        CompositeLoss({"text": text_term}, weights={"text": -1.0})
    with pytest.raises(ValueError, match="must be finite"):
        CompositeLoss().add("text", text_term, weight=float("inf"))
    with pytest.raises(ValueError, match=re.escape("gives weight -1.0 at step 2")):
        CompositeLoss({"text": text_term}, weights={"text": LinearSchedule(1.0, -1.0, 0, 2)})(BATCH, Outputs(), step=2)
    with pytest.raises(ValueError, match="already exists"):
        CompositeLoss({"text": text_term}).add("text", text_term)
    with pytest.raises(ValueError, match="not 'total'"):
        CompositeLoss().add("total", text_term)
    with pytest.raises(ValueError, match=re.escape("without '.' or '/'")):
        CompositeLoss().add("loss/text", text_term)
    with pytest.raises(ValueError, match="must be callable"):
        CompositeLoss().add("text", 3.0)  # type: ignore[arg-type]  # a wrong type on purpose
    with pytest.raises(ValueError, match=r"term 'vec' must return a scalar loss, got shape \(5,\)"):
        CompositeLoss({"vec": lambda b, o: o.a})(BATCH, Outputs())
    with pytest.raises(ValueError, match=re.escape("term 'num' must return a torch.Tensor, got float")):
        CompositeLoss({"num": lambda b, o: 1.0})(BATCH, Outputs())
    with pytest.raises(ValueError, match="on_nonfinite='ignore'"):
        CompositeLoss(on_nonfinite="ignore")  # type: ignore[arg-type]  # a wrong type on purpose
    with pytest.raises(ValueError, match=r"built for terms \['text', 'box'\].*missing: \['box'\]"):
        CompositeLoss({"text": text_term}, weighting=UncertaintyWeighting(["text", "box"]))(BATCH, Outputs())
