"""Weighting strategies against their papers' update rules, written out by hand."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch

from lmloss.multitask import DynamicWeightAverage, FixedWeights, GradNorm, UncertaintyWeighting


def _round_trip(module_state):
    buffer = io.BytesIO()
    torch.save(module_state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- fixed ------------------------------------------------------------------------------


def test_fixed_weights_are_the_weighted_sum():
    a = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(5.0, requires_grad=True)
    total, weights = FixedWeights({"a": 0.25}).combine({"a": a, "b": b})
    assert total.item() == 0.25 * 2.0 + 1.0 * 5.0 and total.dtype == torch.float32
    assert {n: w.item() for n, w in weights.items()} == {"a": 0.25, "b": 1.0}
    total.backward()
    assert (a.grad.item(), b.grad.item()) == (0.25, 1.0)
    with pytest.raises(ValueError, match=r"unknown term name\(s\) \['c'\]"):
        FixedWeights({"c": 1.0}).check_terms(["a", "b"])
    with pytest.raises(ValueError, match=re.escape("weight of term 'a' must be >= 0, got -1.0")):
        FixedWeights({"a": -1.0})


# --- uncertainty weighting (Kendall et al. 2018) ----------------------------------------


def test_uncertainty_loss_and_gradients_by_hand():
    strategy = UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        strategy.log_vars.copy_(torch.tensor([0.3, -0.5]))
    la = torch.tensor(2.0, requires_grad=True)
    lb = torch.tensor(3.0, requires_grad=True)
    total, weights = strategy.combine({"a": la, "b": lb})
    s_a, s_b = 0.3, -0.5
    # L = sum_i 0.5 * exp(-s_i) * L_i + 0.5 * s_i
    expected = 0.5 * math.exp(-s_a) * 2.0 + 0.5 * s_a + 0.5 * math.exp(-s_b) * 3.0 + 0.5 * s_b
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert weights["a"].item() == pytest.approx(0.5 * math.exp(-s_a), rel=1e-6)
    total.backward()
    # dL/dL_i = 0.5 exp(-s_i);  dL/ds_i = -0.5 exp(-s_i) L_i + 0.5
    assert la.grad.item() == pytest.approx(0.5 * math.exp(-s_a), rel=1e-6)
    assert lb.grad.item() == pytest.approx(0.5 * math.exp(-s_b), rel=1e-6)
    expected_ds = [-0.5 * math.exp(-s_a) * 2.0 + 0.5, -0.5 * math.exp(-s_b) * 3.0 + 0.5]
    torch.testing.assert_close(strategy.log_vars.grad, torch.tensor(expected_ds), rtol=1e-6, atol=1e-7)


def test_uncertainty_learns_log_of_the_loss():
    # For fixed L_i the regression form is minimized at s_i = log(L_i) (exp(-s) L = 1).
    strategy = UncertaintyWeighting(["a", "b"])
    losses = {"a": torch.tensor(4.0), "b": torch.tensor(0.25)}
    optimizer = torch.optim.SGD(strategy.parameters(), lr=1.0)
    for _ in range(100):
        optimizer.zero_grad()
        strategy.combine(losses)[0].backward()
        optimizer.step()
    torch.testing.assert_close(strategy.log_vars.detach(), torch.tensor([math.log(4.0), math.log(0.25)]))


def test_uncertainty_checkpoint_and_names():
    strategy = UncertaintyWeighting(["a", "b"], init_log_var=0.7)
    restored = UncertaintyWeighting(["a", "b"])
    restored.load_state_dict(_round_trip(strategy.state_dict()))
    assert restored.log_vars.tolist() == strategy.log_vars.tolist()
    with pytest.raises(ValueError, match="state is for terms"):
        UncertaintyWeighting(["b", "a"]).load_state_dict(strategy.state_dict())
    with pytest.raises(ValueError, match=r"unknown term name\(s\) \['c'\]"):
        strategy.combine({"c": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="missing"):
        strategy.check_terms(["a"])


# --- dynamic weight average (Liu et al. 2019) -------------------------------------------


def _dwa_by_hand(before, last, temperature=2.0):
    """lambda_k = K exp(w_k / T) / sum_j exp(w_j / T), w_k = L_k(t-1) / L_k(t-2)."""
    w = [l1 / l2 for l1, l2 in zip(last, before)]
    denominator = sum(math.exp(x / temperature) for x in w)
    return [len(w) * math.exp(x / temperature) / denominator for x in w]


def test_dwa_weights_from_given_period_losses():
    dwa = DynamicWeightAverage(["a", "b", "c"])
    assert dwa.weights == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert dwa.update({"a": 2.0, "b": 1.0, "c": 4.0}) == {"a": 1.0, "b": 1.0, "c": 1.0}  # first epoch: 1
    second = dwa.update({"a": 1.0, "b": 0.9, "c": 4.4})  # from the third epoch on: the rule
    expected = _dwa_by_hand([2.0, 1.0, 4.0], [1.0, 0.9, 4.4])
    assert list(second.values()) == pytest.approx(expected, rel=1e-12)
    assert sum(second.values()) == pytest.approx(3.0)
    third = dwa.update({"a": 0.5, "b": 0.8, "c": 4.4})  # only the last two periods count
    assert list(third.values()) == pytest.approx(_dwa_by_hand([1.0, 0.9, 4.4], [0.5, 0.8, 4.4]), rel=1e-12)
    losses = {"a": torch.tensor(1.5), "b": torch.tensor(2.0), "c": torch.tensor(0.5)}
    total, weights = dwa.combine(losses)
    assert total.item() == pytest.approx(sum(third[n] * losses[n].item() for n in losses), rel=1e-6)
    assert weights["b"].item() == pytest.approx(third["b"], rel=1e-6)


def test_dwa_averages_what_combine_saw_over_the_period():
    dwa = DynamicWeightAverage(["a", "b"], temperature=1.0)
    for period in ([(3.0, 1.0), (1.0, 1.0)], [(1.0, 0.5), (1.0, 1.5), (1.0, 1.3)]):
        for la, lb in period:
            dwa.combine({"a": torch.tensor(la), "b": torch.tensor(lb)})
        dwa.eval()  # evaluation losses are not recorded
        dwa.combine({"a": torch.tensor(100.0), "b": torch.tensor(100.0)})
        dwa.train()
        dwa.update()
    # period means: (2.0, 1.0) then (1.0, 1.1); the float32 losses hold 1.3 and 1.5 to ~1e-7
    assert list(dwa.weights.values()) == pytest.approx(_dwa_by_hand([2.0, 1.0], [1.0, 1.1], 1.0), rel=1e-6)


def test_dwa_under_a_curriculum_measures_the_task_loss_not_its_schedule():
    """A ramping weight must not look like a rising loss (nor a zero weight like a zero loss)."""
    from lmloss.multitask import CompositeLoss, LinearSchedule

    dwa = DynamicWeightAverage(["a", "b"], temperature=1.0)
    losses = {"a": 2.0, "b": 1.0}
    composite = CompositeLoss(
        {n: (lambda b, o, n=n: torch.tensor(losses[n])) for n in losses},
        weights={"b": LinearSchedule(0.0, 1.0, 0, 4)},
        weighting=dwa,
    )
    for step in range(4):
        composite(None, None, step=step)
        if step % 2 == 1:
            dwa.update()
    # Constant task losses: both rates are 1, so the lambdas stay equal (and nothing raised at weight 0).
    assert list(dwa.weights.values()) == pytest.approx([1.0, 1.0])


def test_dwa_checkpoint_mid_period():
    dwa = DynamicWeightAverage(["a", "b"])
    dwa.update({"a": 2.0, "b": 1.0})
    dwa.combine({"a": torch.tensor(1.0), "b": torch.tensor(0.7)})
    restored = DynamicWeightAverage(["a", "b"])
    restored.load_state_dict(_round_trip(dwa.state_dict()))
    for strategy in (dwa, restored):
        strategy.combine({"a": torch.tensor(0.6), "b": torch.tensor(0.9)})
    assert (
        restored.update()
        == dwa.update()
        == pytest.approx(dict(zip("ab", _dwa_by_hand([2.0, 1.0], [0.8, 0.8]))), rel=1e-6)
    )


def test_dwa_bad_input():
    dwa = DynamicWeightAverage(["a", "b"])
    with pytest.raises(ValueError, match=r"no loss was recorded for term\(s\) \['a', 'b'\]"):
        dwa.update()
    with pytest.raises(ValueError, match=r"unknown: \['c'\]"):
        dwa.update({"a": 1.0, "b": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="must be finite"):
        dwa.update({"a": float("inf"), "b": 1.0})
    dwa.update({"a": 0.0, "b": 1.0})
    with pytest.raises(ValueError, match=re.escape("term 'a' averaged 0.0")):
        dwa.update({"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DynamicWeightAverage(["a"], temperature=0.0)


# --- GradNorm (Chen et al. 2018) ------------------------------------------------------


class TwoTasks:
    """A shared linear layer W [4, 3] and two linear heads; two squared-error losses."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(8, 3, generator=g)
        self.y = torch.randn(2, 8, generator=g) * torch.tensor([[1.0], [3.0]])
        self.shared = torch.nn.Parameter(torch.randn(4, 3, generator=g))
        self.heads = torch.nn.Parameter(torch.randn(2, 4, generator=g))

    def losses(self):
        h = self.x @ self.shared.T
        return {name: ((h @ self.heads[i] - self.y[i]) ** 2).mean() for i, name in enumerate(("t1", "t2"))}


def _gradnorm_by_hand(losses, shared, w, initial, alpha, lr):
    """The paper's rule with G_i from autograd.grad on w_i * L_i; returns (L_grad, w after SGD + renorm)."""
    w = w.clone().requires_grad_(True)
    g = torch.stack(
        [torch.autograd.grad(w[i] * losses[n], shared, create_graph=True)[0].norm() for i, n in enumerate(("t1", "t2"))]
    )
    current = torch.stack([losses["t1"], losses["t2"]]).detach()
    ratio = current / initial
    r = ratio / ratio.mean()
    target = (g.mean() * r**alpha).detach()
    l_grad = (g - target).abs().sum()
    (grad,) = torch.autograd.grad(l_grad, w)
    stepped = w.detach() - lr * grad
    return l_grad.detach(), grad, stepped * 2 / stepped.sum()


def test_gradnorm_one_update_matches_the_paper():
    model = TwoTasks()
    initial = {"t1": 2.0 * model.losses()["t1"].item(), "t2": model.losses()["t2"].item()}
    gradnorm = GradNorm(["t1", "t2"], model.shared, initial_weights={"t1": 0.5, "t2": 1.5}, initial_losses=initial)
    losses = model.losses()
    l_grad, _grad, w_next = _gradnorm_by_hand(
        losses, model.shared, torch.tensor([0.5, 1.5]), torch.tensor([initial["t1"], initial["t2"]]), 1.5, 0.1
    )

    total, weights = gradnorm.combine(losses)
    assert (weights["t1"].item(), weights["t2"].item()) == (0.5, 1.5)
    got = gradnorm.update(losses, lr=0.1)  # before total.backward(): it needs the graph
    torch.testing.assert_close(got, l_grad)
    torch.testing.assert_close(gradnorm.weights.detach(), w_next)
    assert gradnorm.weights.sum().item() == pytest.approx(2.0) and gradnorm.weights.grad is None

    # The model trains on sum_i w_i(t) L_i with the weights of this step held constant.
    total.backward()
    (expected_shared_grad,) = torch.autograd.grad(0.5 * model.losses()["t1"] + 1.5 * model.losses()["t2"], model.shared)
    torch.testing.assert_close(model.shared.grad, expected_shared_grad)
    assert gradnorm.weights.grad is None


def test_gradnorm_by_hand_order_and_with_an_optimizer():
    model = TwoTasks()
    losses = model.losses()
    initial = torch.stack([losses["t1"], losses["t2"]]).detach()  # recorded at the first step
    l_grad, grad, w_next = _gradnorm_by_hand(losses, model.shared, torch.ones(2), initial, 1.5, 0.05)
    assert l_grad.item() > 0  # r_i = 1, but G_1 != G_2: something to correct

    by_hand = GradNorm(["t1", "t2"], [model.shared])
    by_hand.combine(losses)
    by_hand.weight_backward(losses)
    torch.testing.assert_close(by_hand.weights.grad, grad)
    with pytest.raises(RuntimeError, match="renormalize"):
        by_hand.combine(losses)  # the weight step is not finished
    with torch.no_grad():
        by_hand.weights -= 0.05 * by_hand.weights.grad
    by_hand.renormalize()
    torch.testing.assert_close(by_hand.weights.detach(), w_next)

    with_optimizer = GradNorm(["t1", "t2"], model.shared)
    with_optimizer.update(losses, optimizer=torch.optim.SGD(with_optimizer.parameters(), lr=0.05))
    torch.testing.assert_close(with_optimizer.weights.detach(), w_next)
    assert with_optimizer.state_dict()["_extra_state"]["initial_losses"] == pytest.approx(initial.tolist())


def test_gradnorm_renormalizes_and_checkpoints():
    model = TwoTasks()
    gradnorm = GradNorm(["t1", "t2"], model.shared, initial_weights={"t1": 3.0, "t2": 1.0}, alpha=0.5)
    assert gradnorm.weights.tolist() == [1.5, 0.5]  # rescaled to sum to K = 2
    gradnorm.update(model.losses(), lr=0.01)
    restored = GradNorm(["t1", "t2"], model.shared)
    restored.load_state_dict(_round_trip(gradnorm.state_dict()))
    assert restored.weights.tolist() == gradnorm.weights.tolist() and restored.alpha == 0.5
    losses = model.losses()
    torch.testing.assert_close(restored.update(losses, lr=0.01), gradnorm.update(losses, lr=0.01))
    torch.testing.assert_close(restored.weights, gradnorm.weights)


def test_gradnorm_misuse_is_refused():
    model = TwoTasks()
    gradnorm = GradNorm(["t1", "t2"], model.shared)
    losses = model.losses()
    total, _ = gradnorm.combine(losses)
    total.backward()  # too early: the terms' graph is gone
    with pytest.raises(RuntimeError, match=re.escape("before result.total.backward")):
        gradnorm.update(losses, lr=0.1)
    losses = model.losses()
    with pytest.raises(ValueError, match="exactly one of lr= or optimizer="):
        gradnorm.update(losses)
    with pytest.raises(ValueError, match=re.escape("does not hold gradnorm.weights")):
        gradnorm.update(losses, optimizer=torch.optim.SGD([model.heads], lr=0.1))
    with pytest.raises(ValueError, match=r"missing: \['t2'\]"):
        gradnorm.weight_backward({"t1": losses["t1"]})
    with pytest.raises(ValueError, match="not attached to a graph"):
        gradnorm.weight_backward({n: loss.detach() for n, loss in losses.items()})
    with pytest.raises(ValueError, match="initial_weights must be > 0"):
        GradNorm(["t1", "t2"], model.shared, initial_weights={"t1": 0.0, "t2": 1.0})
    with pytest.raises(ValueError, match="require grad"):
        GradNorm(["t1", "t2"], torch.ones(3))


def test_uncertainty_leaves_out_the_regularizer_of_a_term_weighted_zero():
    strategy = UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        strategy.log_vars.copy_(torch.tensor([0.3, -0.5]))
    la = torch.tensor(0.0, requires_grad=True)  # a term already multiplied by its weight 0
    lb = torch.tensor(3.0, requires_grad=True)
    total, weights = strategy.combine({"a": la, "b": lb}, scales={"a": 0.0, "b": 1.0})
    # Only b counts: 0.5 exp(0.5) * 3 + 0.5 * (-0.5); a keeps neither its 0 nor 0.5 * s_a.
    assert total.item() == pytest.approx(0.5 * math.exp(0.5) * 3.0 - 0.25, rel=1e-6)
    assert weights["a"].item() == pytest.approx(0.5 * math.exp(-0.3), rel=1e-6)
    total.backward()
    # ds_a = 0 exactly (without scales it would be 0.5); ds_b = -0.5 exp(0.5) * 3 + 0.5.
    expected = torch.tensor([0.0, -0.5 * math.exp(0.5) * 3.0 + 0.5])
    torch.testing.assert_close(strategy.log_vars.grad, expected, rtol=1e-6, atol=0)
    assert la.grad.item() == pytest.approx(0.5 * math.exp(-0.3), rel=1e-6)  # the term stays in the graph


def test_uncertainty_under_a_curriculum_does_not_drift_while_the_weight_is_zero():
    from lmloss.multitask import CompositeLoss, LinearSchedule

    strategy = UncertaintyWeighting(["text", "box"])
    composite = CompositeLoss(
        {"text": lambda b, o: torch.tensor(2.0), "box": lambda b, o: torch.tensor(4.0)},
        weights={"box": LinearSchedule(0.0, 1.0, 5, 7)},
        weighting=strategy,
    )
    optimizer = torch.optim.SGD(strategy.parameters(), lr=1.0)
    for step in range(5):  # box weight 0 at steps 0..4
        optimizer.zero_grad()
        composite(None, None, step=step).total.backward()
        optimizer.step()
    # s_box never moved (it would be -2.5 after 5 steps of gradient 0.5); s_text did.
    assert strategy.log_vars[1].item() == 0.0
    assert strategy.log_vars[0].item() != 0.0
    optimizer.zero_grad()
    result = composite(None, None, step=6)  # weight 0.5: the term is on
    result.total.backward()
    # d/ds_box of 0.5 exp(-s) (0.5 * 4) + 0.5 s at s = 0: -0.5 * 2 + 0.5
    assert strategy.log_vars.grad[1].item() == pytest.approx(-0.5, rel=1e-6)
    assert result.weights["box"].item() == pytest.approx(0.5 * 0.5, rel=1e-6)  # schedule x 0.5 exp(-0)


class Linear:
    """Terms ``L = p * theta + q`` on one shared scalar ``theta = 1``: value ``p + q``, gradient ``p``."""

    def __init__(self):
        self.theta = torch.nn.Parameter(torch.tensor([1.0]))

    def losses(self, **terms):
        return {name: (p * self.theta + q).sum() for name, (p, q) in terms.items()}


def test_gradnorm_defers_l0_of_a_term_that_starts_at_zero():
    model = Linear()
    gradnorm = GradNorm(["a", "b"], model.theta)
    # Step 1: L_a = 2 (grad 2), L_b = 0 (grad 3): b (a box loss without boxes) has no L_b(0) yet.
    # L_a(0) = 2 -> ratio_a = 1; ratio_b = 1 (neutral); r = [1, 1]. G = [1*2, 1*3], mean 2.5,
    # target [2.5, 2.5]; L_grad = 0.5 + 0.5 = 1; dL/dw = [-2, +3]. SGD 0.1: [1.2, 0.7] -> x 2/1.9.
    l_grad = gradnorm.update(model.losses(a=(2.0, 0.0), b=(3.0, -3.0)), lr=0.1)
    assert l_grad.item() == pytest.approx(1.0, rel=1e-6) and not gradnorm.last_step_skipped
    torch.testing.assert_close(gradnorm.weights.detach(), torch.tensor([24 / 19, 14 / 19]))
    assert gradnorm.initial_losses_recorded == {"a": True, "b": False}
    assert gradnorm.state_dict()["_extra_state"]["initial_losses"] == [2.0, None]

    # Step 2: L_a = 1 (grad 1), L_b = 2 (grad 4): L_b(0) = 2 now. ratios [1/2, 1], mean 3/4,
    # r = [2/3, 4/3]. G = [24/19 * 1, 14/19 * 4] = [24/19, 56/19], mean 40/19.
    w = [24 / 19, 14 / 19]
    g = [w[0] * 1, w[1] * 4]
    target = [40 / 19 * (2 / 3) ** 1.5, 40 / 19 * (4 / 3) ** 1.5]  # 1.1460, 3.2413
    assert g[0] > target[0] and g[1] < target[1]  # so dL/dw_a = +1 * 1, dL/dw_b = -1 * 4
    expected_l_grad = (g[0] - target[0]) + (target[1] - g[1])
    stepped = [w[0] - 0.1 * 1, w[1] + 0.1 * 4]
    l_grad = gradnorm.update(model.losses(a=(1.0, 0.0), b=(4.0, -2.0)), lr=0.1)
    assert l_grad.item() == pytest.approx(expected_l_grad, rel=1e-5)
    expected_w = torch.tensor([v * 2 / sum(stepped) for v in stepped])
    torch.testing.assert_close(gradnorm.weights.detach(), expected_w)
    assert gradnorm.state_dict()["_extra_state"]["initial_losses"] == [2.0, 2.0]
    # A checkpoint taken while a term is deferred restores the deferral.
    restored = GradNorm(["a", "b"], model.theta)
    restored.load_state_dict(_round_trip(GradNorm(["a", "b"], model.theta).state_dict()))
    assert restored.initial_losses_recorded == {"a": False, "b": False}


def test_gradnorm_skips_the_weight_update_when_the_mean_ratio_is_zero_or_not_finite():
    model = Linear()
    gradnorm = GradNorm(["a", "b"], model.theta, initial_losses={"a": 2.0, "b": 3.0})
    optimizer = torch.optim.Adam(gradnorm.parameters(), lr=0.1)
    gradnorm.update(model.losses(a=(2.0, 0.0), b=(3.0, 0.0)), optimizer=optimizer)  # Adam has momentum now
    before = gradnorm.weights.detach().clone()
    # Every term 0: ratios [0, 0], mean 0, r = 0/0. Skipped: weights exactly as they were
    # (no Adam step either: its momentum would have moved them), L_grad reported as 0.
    for zero_or_nan in [dict(a=(2.0, -2.0), b=(3.0, -3.0)), dict(a=(2.0, float("nan")), b=(3.0, 0.0))]:
        l_grad = gradnorm.update(model.losses(**zero_or_nan), optimizer=optimizer)
        assert gradnorm.last_step_skipped and l_grad.item() == 0.0
        assert torch.equal(gradnorm.weights.detach(), before) and gradnorm.weights.grad is None
    # By hand: weight_backward leaves no gradient, so an optimizer step skips the weights.
    gradnorm.weight_backward(model.losses(a=(2.0, -2.0), b=(3.0, -3.0)))
    optimizer.step()
    assert torch.equal(gradnorm.weights.detach(), before)
    gradnorm.combine(model.losses(a=(1.0, 0.0), b=(1.0, 0.0)))  # no pending renormalize
    # The next ordinary step updates again.
    gradnorm.update(model.losses(a=(2.0, 0.0), b=(3.0, 0.0)), optimizer=optimizer)
    assert not gradnorm.last_step_skipped and not torch.equal(gradnorm.weights.detach(), before)
    # All zero before any L_i(0) is known is not a skip: every ratio is neutral (1).
    fresh = GradNorm(["a", "b"], model.theta)
    fresh.update(model.losses(a=(2.0, -2.0), b=(3.0, -3.0)), lr=0.1)
    assert not fresh.last_step_skipped and fresh.initial_losses_recorded == {"a": False, "b": False}
    torch.testing.assert_close(fresh.weights.detach(), torch.tensor([24 / 19, 14 / 19]))  # as step 1 above
    with pytest.raises(ValueError, match="GradNorm needs losses >= 0"):
        fresh.weight_backward(model.losses(a=(1.0, -2.0), b=(1.0, 0.0)))
    # A NaN term is a skip even before it has an L_i(0) (a neutral ratio would hide it).
    fresh.update(model.losses(a=(2.0, 0.0), b=(3.0, float("nan"))), lr=0.1)
    assert fresh.last_step_skipped and fresh.initial_losses_recorded == {"a": True, "b": False}
    assert torch.isfinite(fresh.weights).all()
