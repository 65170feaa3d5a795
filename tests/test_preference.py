"""lmloss.preference against TRL 1.16's own loss code (DPOTrainer._compute_loss, CPO, ORPO) and KTO's formula."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import lmloss
from lmloss.preference import dpo_loss, kto_loss, orpo_loss, sequence_logprobs, simpo_loss

B, T = 3, 6


class _Acc:
    device = torch.device("cpu")

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather


def _pairs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs [2B, T-1] of a [chosen; rejected] batch, its ref, and completion masks [2B, T]."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i in range(2 * B):
        start = int(torch.randint(1, 3, (1,), generator=g))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        mask[i, start:end] = 1
    shifted = mask[:, 1:]
    per_token = -torch.rand(2 * B, T - 1, generator=g) * 2 * shifted
    ref = -torch.rand(2 * B, T - 1, generator=g) * 2 * shifted
    return per_token, ref, mask


def _trl_dpo(per_token: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, loss_type: str, beta: float, ls: float):
    """TRL's own DPOTrainer._compute_loss; the model is a stand-in returning the fused-head outputs."""
    from trl import DPOTrainer

    trainer: Any = DPOTrainer.__new__(DPOTrainer)
    attrs = dict(
        accelerator=_Acc(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=ls,
        use_weighting=False,
        _total_train_tokens=0,
        _tp_size=1,
        model=SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    for k, v in attrs.items():
        setattr(trainer, k, v)
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    ref_logps = ref.sum(1)
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": ref_logps[:B],
        "ref_rejected_logps": ref_logps[B:],
    }
    loss = trainer._compute_loss(lambda **kw: outputs, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize(
    "loss_type, ls", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.0), ("robust", 0.2)]
)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpo_equals_trl_compute_loss(loss_type: str, ls: float, beta: float) -> None:
    per_token, ref, mask = _pairs(seed=int(beta * 10))
    lp_trl = per_token.clone().requires_grad_()
    theirs, metrics = _trl_dpo(lp_trl, ref, mask, loss_type, beta, ls)
    lp = per_token.clone().requires_grad_()
    if loss_type == "ipo":  # TRL averages the log-ratios per completion token
        n = mask.sum(1).clamp(min=1)
        logps, ref_logps = lp.sum(1) / n, ref.sum(1) / n
    else:
        logps, ref_logps = lp.sum(1), ref.sum(1)
    ours = dpo_loss(
        logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta=beta, loss_type=loss_type, label_smoothing=ls
    )
    assert ours.losses.shape == (B,)
    torch.testing.assert_close(ours.losses.mean(), theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours.losses.mean(), lp)[0], torch.autograd.grad(theirs, lp_trl)[0])
    # TRL's logged rewards are the (uncentred) means of beta * log-ratio.
    if loss_type != "ipo":
        assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], rel=1e-5)
        assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], rel=1e-5)


def test_sigmoid_label_smoothing_is_cdpo() -> None:
    """cDPO: smoothing mixes the flipped-label loss (float64 by hand)."""
    c, r = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0])
    rc, rr = torch.tensor([-2.5, -1.5]), torch.tensor([-2.0, -3.0])
    d = ((c - rc) - (r - rr)).double()
    expected = -0.9 * F.logsigmoid(0.5 * d) - 0.1 * F.logsigmoid(-0.5 * d)
    out = dpo_loss(c, r, rc, rr, beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(out.losses.double(), expected, rtol=1e-6, atol=1e-7)


def _trl_method(cls_path: str, method: str, **attrs: object):
    module, name = cls_path.rsplit(".", 1)
    cls = getattr(__import__(module, fromlist=[name]), name)
    obj: Any = cls.__new__(cls)
    obj.accelerator = _Acc()
    for k, v in attrs.items():
        setattr(obj, k, v)
    return getattr(obj, method)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_simpo_equals_trl_cpo_loss(ls: float) -> None:
    g = torch.Generator().manual_seed(2)
    c, r = -torch.rand(5, generator=g) * 2, -torch.rand(5, generator=g) * 2
    cpo = _trl_method(
        "trl.experimental.cpo.cpo_trainer.CPOTrainer",
        "cpo_loss",
        alpha=0.0,
        beta=2.0,
        simpo_gamma=0.7,
        label_smoothing=ls,
        loss_type="simpo",
    )
    losses, cr, rr = cpo(c, r)
    ours = simpo_loss(c, r, beta=2.0, gamma=0.7, label_smoothing=ls)
    torch.testing.assert_close(ours.losses, losses)
    torch.testing.assert_close(ours.chosen_rewards, cr)
    torch.testing.assert_close(ours.rejected_rewards, rr)


def test_orpo_equals_trl_odds_ratio_loss() -> None:
    g = torch.Generator().manual_seed(3)
    c = -torch.rand(6, generator=g) * 3 - 1e-3
    r = -torch.rand(6, generator=g) * 3 - 1e-3
    c[0], r[0] = -0.01, -5.0  # both sides of the -log 2 branch of log(1 - e^x)
    orpo = _trl_method("trl.experimental.orpo.orpo_trainer.ORPOTrainer", "odds_ratio_loss", beta=0.25)
    losses, cr, rr, _, _ = orpo(c, r)
    ours = orpo_loss(c, r, beta=0.25)
    torch.testing.assert_close(ours.losses, -losses)  # TRL returns the negated term and subtracts its mean
    torch.testing.assert_close(ours.chosen_rewards, cr)
    torch.testing.assert_close(ours.rejected_rewards, rr)


def test_kto_matches_trl_formula_in_float64() -> None:
    """Transcribed from KTOTrainer's loss_type='kto' branch (its loss is inline in the batch method)."""
    g = torch.Generator().manual_seed(4)
    c, rc = -torch.rand(3, generator=g) * 4, -torch.rand(3, generator=g) * 4
    r, rr = -torch.rand(5, generator=g) * 4, -torch.rand(5, generator=g) * 4
    kl = torch.tensor(0.3)
    beta, dw, uw = 0.2, 1.0, 1.33
    c64, rc64, r64, rr64, kl64 = (x.double() for x in (c, rc, r, rr, kl))
    expected = torch.cat(
        [dw * (1 - torch.sigmoid(beta * ((c64 - rc64) - kl64))), uw * (1 - torch.sigmoid(beta * (kl64 - (r64 - rr64))))]
    )
    out = kto_loss(c, r, rc, rr, kl=kl, beta=beta, desirable_weight=dw, undesirable_weight=uw)
    torch.testing.assert_close(out.losses.double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.chosen_rewards.double(), beta * (c64 - rc64), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_from_logits_and_hidden_match_float64(average: bool) -> None:
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 7, 8, generator=g, requires_grad=True)
    weight = torch.randn(19, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 19, (4, 7), generator=g)
    labels[:, :3] = -100  # prompt
    labels[3, 5:] = -100  # padding
    from_hidden = sequence_logprobs(hidden, labels, weight=weight, average=average)
    from_logits = sequence_logprobs(hidden @ weight.T, labels, average=average)
    logp = torch.log_softmax((hidden @ weight.T).double()[:, :-1], -1)
    tgt = labels[:, 1:]
    per = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (tgt != -100)
    expected = per.sum(1) / ((tgt != -100).sum(1) if average else 1)
    for out in (from_hidden, from_logits):
        torch.testing.assert_close(out.logps.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_hidden.chosen, from_hidden.logps[:2])
    torch.testing.assert_close(from_hidden.rejected, from_hidden.logps[2:])
    (gw,) = torch.autograd.grad(from_hidden.logps.sum(), weight)
    assert torch.isfinite(gw).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2)), "rejected_logps has shape"),
        (lambda: dpo_loss(*[torch.zeros(2)] * 4, loss_type="kto"), "loss_type='kto'"),
        (lambda: dpo_loss(*[torch.zeros(2)] * 4, beta=0.0), "beta must be > 0"),
        (lambda: dpo_loss(*[torch.zeros(2)] * 4, label_smoothing=0.5), "label_smoothing"),
        (lambda: dpo_loss(*[torch.zeros(2)] * 4, loss_type="ipo", label_smoothing=0.1), "no meaning"),
        (lambda: simpo_loss(torch.zeros(2, 1), torch.zeros(2, 1)), r"floating \[B\]"),
        (lambda: sequence_logprobs(torch.zeros(3, 4, 5), torch.zeros(3, 4, dtype=torch.long)).chosen, "even size"),
    ],
)
def test_bad_input_names_the_problem(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_exported() -> None:
    assert lmloss.preference.dpo_loss is dpo_loss
