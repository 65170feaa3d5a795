"""lmloss.rl.policy_loss against TRL 1.16's own GRPOTrainer._compute_loss, and exact accumulation."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lmloss
from _dist import run_gloo
from _trl import trl_grpo_loss
from lmloss.rl import LOSS_TYPES, policy_loss

B, T = 5, 7
TRL_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")


def _batch(seed: int = 0, b: int = B, t: int = T, token_adv: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t) < lengths[:, None]).long()
    logprobs = -torch.rand(b, t, generator=g) * 3
    old = logprobs + (torch.rand(b, t, generator=g) - 0.5) * 0.8  # ratios e^[-0.4, 0.4]: some clipped
    ref = logprobs + (torch.rand(b, t, generator=g) - 0.5) * 0.6
    adv = torch.randn(b, t, generator=g) if token_adv else torch.randn(b, generator=g)
    return {"logprobs": logprobs, "old": old, "ref": ref, "adv": adv, "mask": mask}


def _ours(batch: dict[str, torch.Tensor], lp: torch.Tensor, **kw: object) -> lmloss.rl.PolicyLossResult:
    ref = batch["ref"] if kw.get("beta", 0.0) else None
    return policy_loss(lp, batch["old"], batch["adv"], batch["mask"], ref_logprobs=ref, **kw)  # type: ignore[arg-type]  # mixed-type dict


def _trl(batch: dict[str, torch.Tensor], lp: torch.Tensor, **kw: object) -> tuple[torch.Tensor, dict]:
    inputs = {
        "completion_mask": batch["mask"],
        "advantages": batch["adv"],
        "old_per_token_logps": batch["old"],
        "ref_per_token_logps": batch["ref"],
        "num_items_in_batch": batch["mask"].sum(),
    }
    return trl_grpo_loss(lp, inputs, **kw)  # type: ignore[arg-type]  # mixed-type dict


@pytest.mark.parametrize("loss_type", TRL_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize(
    "extra", [{}, {"delta": 1.15}, {"beta": 0.04}, {"epsilon_high": 0.28}, {"beta": 0.1, "kl": True}]
)
@pytest.mark.parametrize("token_adv", [False, True])
def test_equals_trl_compute_loss(loss_type: str, level: str, extra: dict, token_adv: bool) -> None:
    batch = _batch(seed=len(loss_type) + 7 * len(extra), token_adv=token_adv)
    extra = dict(extra)
    correction = extra.pop("kl", False)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, **extra)
    if loss_type == "dr_grpo":
        kw["max_completion_length"] = T + 2
    if loss_type == "cispo" and "epsilon_high" not in extra:
        kw["epsilon_high"] = 1.1  # cispo caps the ratio itself
    lp_ours = batch["logprobs"].clone().requires_grad_()
    lp_trl = batch["logprobs"].clone().requires_grad_()
    ours = _ours(batch, lp_ours, kl_importance_correction=correction, **kw)
    theirs, metrics = _trl(batch, lp_trl, use_bias_correction_kl=correction, **kw)
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours.loss, lp_ours)
    (g_trl,) = torch.autograd.grad(theirs, lp_trl)
    torch.testing.assert_close(g_ours, g_trl, rtol=1e-5, atol=1e-7)
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        for name in ("low", "high", "region"):
            assert ours.metrics[f"clip_ratio/{name}"].item() == pytest.approx(metrics[f"clip_ratio/{name}_mean"][0])
    if loss_type == "cispo":
        assert ours.metrics["clip_ratio/high"].item() == pytest.approx(metrics["cispo_clip_ratio"][0])
    if "beta" in extra:
        assert ours.metrics["kl"].item() == pytest.approx(metrics["kl"][0], rel=1e-5)


VESPO_GAMMA = {"vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5, "vespo_k_neg": 4.0, "vespo_lambda_neg": 1.2}


@pytest.mark.parametrize("extra", [{}, {"beta": 0.04}, {"beta": 0.1, "kl": True}, {"gamma": True}])
@pytest.mark.parametrize("token_adv", [False, True])
@pytest.mark.parametrize("wide", [False, True])
def test_vespo_equals_trl_compute_loss(extra: dict, token_adv: bool, wide: bool) -> None:
    """vespo (token level only) with both advantage signs. ``wide``: sequence log-ratios up to
    about +-10 (phi near 0), and in row 0 one token at log r = 25, which only the per-token
    clamp at 20 brings back to log w = 0 (phi = 1 with it, about 0 without)."""
    batch = _batch(seed=11 + len(extra), token_adv=token_adv)
    if wide:
        g = torch.Generator().manual_seed(4)
        batch["old"] = batch["logprobs"] + (torch.rand(B, T, generator=g) - 0.5) * 3.0
        batch["old"][0] = batch["logprobs"][0] + 20.0 / (T - 1)
        batch["old"][0, 0] = batch["logprobs"][0, 0] - 25.0
    assert (batch["adv"] > 0).any() and (batch["adv"] < 0).any()
    extra = dict(extra)
    correction = extra.pop("kl", False)
    gamma = VESPO_GAMMA if extra.pop("gamma", False) else {}
    kw = dict(loss_type="vespo", **extra, **gamma)
    lp_ours = batch["logprobs"].clone().requires_grad_()
    lp_trl = batch["logprobs"].clone().requires_grad_()
    ours = _ours(batch, lp_ours, kl_importance_correction=correction, **kw)
    theirs, metrics = _trl(batch, lp_trl, use_bias_correction_kl=correction, **kw)
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours.loss, lp_ours)
    (g_trl,) = torch.autograd.grad(theirs, lp_trl)
    torch.testing.assert_close(g_ours, g_trl, rtol=1e-5, atol=1e-7)
    assert ours.metrics["vespo/phi_seq_mean"].item() == pytest.approx(metrics["vespo/phi_seq_mean"][0], rel=1e-5)
    if "beta" in extra:
        assert ours.metrics["kl"].item() == pytest.approx(metrics["kl"][0], rel=1e-5)


def test_vespo_weights_are_not_trivial() -> None:
    """The batches above give phi away from 1 on both sides (else k/lambda would go untested)."""
    batch = _batch(seed=11)
    phi = _ours(batch, batch["logprobs"], loss_type="vespo").metrics["vespo/phi_seq_mean"].item()
    assert abs(phi - 1.0) > 1e-2
    other = _ours(batch, batch["logprobs"], loss_type="vespo", **VESPO_GAMMA).metrics["vespo/phi_seq_mean"].item()
    assert abs(other - phi) > 1e-2


def test_clipping_is_exercised() -> None:
    """The batches above clip on both sides, so the min/clamp branches are really compared."""
    batch = _batch()
    m = _ours(batch, batch["logprobs"], loss_type="dapo").metrics
    assert 0 < m["clip_ratio/region"].item() < 1


def _split_loss(batch: dict, rows: list[slice], loss_type: str, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of micro-batch losses with the step's count, and the gradient w.r.t. the full logprobs."""
    lp = batch["logprobs"].clone().requires_grad_()
    count = sum(lmloss.count_targets(batch["mask"][r], loss_type=loss_type) for r in rows)
    total = sum(
        policy_loss(
            lp[r],
            batch["old"][r],
            batch["adv"][r],
            batch["mask"][r],
            loss_type=loss_type,
            num_items_in_batch=count,
            **kw,  # type: ignore[arg-type]  # mixed-type dict
        ).loss
        for r in rows
    )
    (grad,) = torch.autograd.grad(total, lp)
    return total.detach(), grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_uneven_micro_batches_equal_the_big_batch(loss_type: str) -> None:
    batch = _batch(seed=3, b=7)
    kw: dict = {"max_completion_length": T} if loss_type == "dr_grpo" else {}
    if loss_type == "vespo":
        kw = dict(VESPO_GAMMA)
    rows = [slice(0, 1), slice(1, 5), slice(5, 7)]
    total, grad = _split_loss(batch, rows, loss_type, **kw)
    lp = batch["logprobs"].clone().requires_grad_()
    big = policy_loss(lp, batch["old"], batch["adv"], batch["mask"], loss_type=loss_type, **kw).loss  # type: ignore[arg-type]  # mixed-type dict
    (big_grad,) = torch.autograd.grad(big, lp)
    torch.testing.assert_close(total, big.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, big_grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_trl_accumulation_divisor_differs_on_uneven_micro_batches(loss_type: str) -> None:
    """TRL divides each micro-batch's mean by the accumulation count: not the big batch's loss."""
    batch = _batch(seed=3, b=7)
    kw = {"max_completion_length": T} if loss_type == "dr_grpo" else {}
    rows = [slice(0, 1), slice(1, 5), slice(5, 7)]
    trl_total = sum(
        _trl(
            {k: v[r] for k, v in batch.items()},
            batch["logprobs"][r],
            loss_type=loss_type,
            accumulation_steps=len(rows),
            **kw,
        )[0]
        for r in rows
    )
    big, _ = _trl(batch, batch["logprobs"], loss_type=loss_type, **kw)
    ours, _ = _split_loss(batch, rows, loss_type, **kw)
    torch.testing.assert_close(ours, big, rtol=1e-6, atol=1e-7)
    assert abs(float(trl_total) - float(big)) > 1e-3


def _rank_worker(rank: int, world: int, loss_type: str) -> torch.Tensor:
    """Each rank: its uneven micro-batches; gradients of a shared lm_head averaged as DDP does."""
    import torch.distributed as dist

    torch.manual_seed(0)
    hidden, weight, labels, mask, old, adv = _rl_problem()
    w = weight.clone().requires_grad_()
    mine = [slice(0, 1), slice(1, 4)] if rank == 0 else [slice(4, 6), slice(6, 7), slice(7, 9)]
    steps = [{"completion_mask": mask[r], "rows": r} for r in mine]
    kw = {"max_completion_length": 6} if loss_type == "dr_grpo" else {}
    for mb in lmloss.micro_batches(steps, labels_key="completion_mask", loss_type=loss_type, group=dist.group.WORLD):
        r = mb.batch["rows"]
        lp = lmloss.linear_token_logprobs(hidden[r], w, labels[r], shift=False).logprobs
        out = policy_loss(
            lp, old[r], adv[r], mask[r], loss_type=loss_type, num_items_in_batch=mb.num_items_in_batch, **kw
        )  # type: ignore[arg-type]  # mixed-type dict
        (out.loss * mb.loss_scale).backward()
    dist.all_reduce(w.grad)
    return w.grad / world


def _rl_problem() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(9, 6, 4, generator=g)
    weight = torch.randn(11, 4, generator=g)
    labels = torch.randint(0, 11, (9, 6), generator=g)
    lengths = torch.randint(0, 7, (9,), generator=g)
    mask = (torch.arange(6) < lengths[:, None]).long()
    with torch.no_grad():
        old = lmloss.token_logprobs(hidden @ weight.T, labels, shift=False).logprobs + 0.3 * torch.randn(
            9, 6, generator=g
        )
    adv = torch.randn(9, generator=g)
    return hidden, weight, labels, mask, old, adv


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_two_gloo_ranks_equal_the_big_batch(loss_type: str) -> None:
    grads = run_gloo(_rank_worker, 2, loss_type)
    hidden, weight, labels, mask, old, adv = _rl_problem()
    w = weight.clone().requires_grad_()
    lp = lmloss.linear_token_logprobs(hidden, w, labels, shift=False).logprobs
    policy_loss(lp, old, adv, mask, loss_type=loss_type).loss.backward()
    for g in grads:
        torch.testing.assert_close(g, w.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_masked_is_zero_with_zero_gradient(loss_type: str) -> None:
    lp = torch.randn(2, 3, requires_grad=True)
    kw = {"max_completion_length": 3} if loss_type == "dr_grpo" else {}
    out = policy_loss(
        lp, lp.detach() + 1, torch.ones(2), torch.zeros(2, 3), loss_type=loss_type, num_items_in_batch=0, **kw
    )  # type: ignore[arg-type]  # mixed-type dict
    assert out.loss.item() == 0.0
    (grad,) = torch.autograd.grad(out.loss, lp)
    assert torch.equal(grad, torch.zeros_like(grad))
    assert all(torch.isfinite(v) for v in out.metrics.values())


def test_masked_positions_may_hold_garbage() -> None:
    batch = _batch()
    lp = batch["logprobs"].masked_fill(batch["mask"] == 0, float("-inf"))
    old = batch["old"].masked_fill(batch["mask"] == 0, float("nan"))
    out = policy_loss(lp, old, batch["adv"], batch["mask"], loss_type="grpo", importance_sampling_level="sequence")
    clean = policy_loss(
        batch["logprobs"],
        batch["old"],
        batch["adv"],
        batch["mask"],
        loss_type="grpo",
        importance_sampling_level="sequence",
    )
    torch.testing.assert_close(out.loss, clean.loss)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask": torch.ones(B, T + 1)}, "mask has shape"),
        ({"advantages": torch.ones(B + 1)}, "advantages has shape"),
        ({"old_logprobs": torch.zeros(B, 2)}, "old_logprobs has shape"),
        ({"loss_type": "ppo"}, "loss_type='ppo'"),
        ({"loss_type": "dr_grpo"}, "max_completion_length"),
        ({"epsilon": 1.5}, "epsilon must be in"),
        ({"epsilon": -0.1}, "epsilon must be in"),
        ({"epsilon_high": -0.1}, "epsilon_high"),
        ({"delta": 0.9}, "delta"),
        ({"beta": 0.1}, "ref_logprobs"),
        ({"advantages": torch.tensor([0.0, 1.0, float("nan"), 0.0, 0.0])}, r"advantages\[2\]"),
        ({"importance_sampling_level": "batch"}, "importance_sampling_level"),
        ({"num_items_in_batch": float("inf")}, "num_items_in_batch"),
        ({"loss_type": "vespo", "importance_sampling_level": "sequence"}, "importance_sampling_level='token'"),
        ({"vespo_k_pos": -1.0}, "vespo_k_pos"),
        ({"vespo_k_neg": float("inf")}, "vespo_k_neg"),
        ({"vespo_lambda_pos": 0.0}, "vespo_lambda_pos"),
        ({"vespo_lambda_neg": float("nan")}, "vespo_lambda_neg"),
    ],
)
def test_bad_input_names_the_problem(kwargs: dict, message: str) -> None:
    args = {
        "logprobs": torch.zeros(B, T),
        "old_logprobs": torch.zeros(B, T),
        "advantages": torch.ones(B),
        "mask": torch.ones(B, T),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        policy_loss(**args)  # type: ignore[arg-type]  # options in a dict of mixed types


@settings(max_examples=25, deadline=None)
@given(
    loss_type=st.sampled_from(LOSS_TYPES),
    level=st.sampled_from(["token", "sequence"]),
    cuts=st.lists(st.integers(1, 8), min_size=0, max_size=4, unique=True),
    seed=st.integers(0, 1000),
)
def test_any_split_into_micro_batches_sums_to_the_big_batch(
    loss_type: str, level: str, cuts: list[int], seed: int
) -> None:
    batch = _batch(seed=seed, b=9)
    batch["mask"][seed % 9] = 0  # an empty sequence, sometimes inside a micro-batch of its own
    if loss_type == "vespo":
        level = "token"  # vespo forms its own sequence weight
    bounds = [0, *sorted(cuts), 9]
    rows = [slice(a, b) for a, b in itertools.pairwise(bounds)]
    kw = {"max_completion_length": T, "importance_sampling_level": level, "beta": 0.05}
    lp = batch["logprobs"].clone().requires_grad_()
    count = sum(lmloss.count_targets(batch["mask"][r], loss_type=loss_type) for r in rows)
    total = sum(
        policy_loss(
            lp[r],
            batch["old"][r],
            batch["adv"][r],
            batch["mask"][r],
            loss_type=loss_type,
            ref_logprobs=batch["ref"][r],
            num_items_in_batch=count,
            **kw,
        ).loss  # type: ignore[arg-type]  # mixed-type dict
        for r in rows
    )
    big = policy_loss(
        lp, batch["old"], batch["adv"], batch["mask"], loss_type=loss_type, ref_logprobs=batch["ref"], **kw
    ).loss  # type: ignore[arg-type]  # mixed-type dict
    torch.testing.assert_close(total, big, rtol=1e-5, atol=1e-7)
    g_split, g_big = (torch.autograd.grad(x, lp)[0] for x in (total, big))
    torch.testing.assert_close(g_split, g_big, rtol=1e-5, atol=1e-8)


def test_without_value_checks_the_loss_is_the_same() -> None:
    batch = _batch()
    with lmloss.validation(False):
        quiet = policy_loss(
            batch["logprobs"],
            batch["old"],
            batch["adv"],
            batch["mask"],
            loss_type="dapo",
            num_items_in_batch=torch.tensor(30.0),
        )
    loud = policy_loss(
        batch["logprobs"],
        batch["old"],
        batch["adv"],
        batch["mask"],
        loss_type="dapo",
        num_items_in_batch=torch.tensor(30.0),
    )
    assert torch.equal(quiet.loss, loud.loss)
