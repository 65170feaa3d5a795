"""LossMonitor under a process group: two real gloo processes with uneven target counts log
the global numbers (sums of losses, tokens and correct tokens over the ranks), checked
against values worked out by hand, not against a mean of the ranks' means."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist

from _dist import run_gloo
from lmloss.monitor import LossMonitor

NAN = float("nan")

# Per step and rank: the per-token losses of that rank's targets and how many were predicted right.
STEPS: list[list[dict[str, Any]]] = [
    [{"losses": [1.0, 2.0, 3.0], "correct": 2}, {"losses": [5.0], "correct": 0}],
    [{"losses": [], "correct": 0}, {"losses": [2.0, 4.0], "correct": 1}],  # rank 0 has no target
    [{"losses": [1.0, 2.0], "correct": 2}, {"losses": [], "correct": 0}],  # rank 1 has none
]
# Evaluation at step 2: rank 0 holds 1 token with loss 2, rank 1 holds 3 tokens with mean loss 4.
EVAL = [{"losses": [2.0]}, {"losses": [3.0, 4.0, 5.0]}]


class ListSink:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(dict(record))

    def close(self) -> None:
        pass


def _local_mean(losses: list[float]) -> float:
    return sum(losses) / len(losses) if losses else NAN  # an empty mean: what torch.mean gives


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    sinks = {"written": ListSink(), "default": ListSink()}
    monitor = LossMonitor(group=dist.group.WORLD, sinks=[sinks["written"]], write_sinks=True)
    quiet = LossMonitor(group=dist.group.WORLD, sinks=[sinks["default"]])  # writes on rank 0 only
    for step, ranks in enumerate(STEPS):
        mine = ranks[rank]
        tokens = len(mine["losses"])
        loss: Any = _local_mean(mine["losses"])
        aux = 0.1 * (rank + 1) if tokens else NAN
        if step == 2:  # tensors this time (they are read at the flush, not here)
            loss, tokens = torch.tensor(loss, dtype=torch.float64), torch.tensor(tokens)
        for m in (monitor, quiet):
            m.update(
                step,
                loss=loss,
                tokens=tokens,
                correct=mine["correct"],
                grad_norm=2.0,
                lr=1e-3,
                terms={"aux": aux},
                z_loss=aux / 10,
                input_tokens=tokens + 5,
            )
    eval_losses = EVAL[rank]["losses"]
    monitor.update_eval(2, loss=_local_mean(eval_losses), tokens=len(eval_losses))
    quiet.update_eval(2, loss=_local_mean(eval_losses), tokens=len(eval_losses))
    monitor.close()
    quiet.close()
    return {
        "records": sinks["written"].records,
        "default": sinks["default"].records,
        "events": [e.kind for e in monitor.events],
        "stats": monitor.stats,
    }


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_gloo(_worker, 2)


@pytest.mark.distributed
def test_train_numbers_are_global_sums_worked_out_by_hand(ranks):
    for result in ranks:
        train = [r for r in result["records"] if r.get("split") == "train"]
        assert [r["step"] for r in train] == [0, 1, 2]
        # Step 0: (1 + 2 + 3 + 5) / 4 tokens, not the mean of the means (2 + 5) / 2 = 3.5.
        assert train[0]["train/loss"] == pytest.approx(11 / 4, rel=1e-12)
        assert train[0]["train/tokens"] == 4 and train[0]["train/accuracy"] == pytest.approx(2 / 4)
        # Steps 1 and 2: the rank without a target (its mean is NaN) adds nothing.
        assert train[1]["train/loss"] == pytest.approx(3.0, rel=1e-12)
        assert train[1]["train/tokens"] == 2 and train[1]["train/accuracy"] == pytest.approx(1 / 2)
        assert train[2]["train/loss"] == pytest.approx(1.5, rel=1e-12)
        assert train[2]["train/tokens"] == 2 and train[2]["train/accuracy"] == pytest.approx(1.0)
        assert [r["train/tokens_seen"] for r in train] == [4, 6, 8]
        # The per-term loss is token-weighted too: (0.1 * 3 + 0.2 * 1) / 4, then 0.2, then 0.1.
        assert [r["train/term/aux"] for r in train] == pytest.approx([0.5 / 4, 0.2, 0.1], rel=1e-12)
        assert [r["train/ppl"] for r in train] == pytest.approx([math.exp(2.75), math.exp(3.0), math.exp(1.5)])
        assert all(r["train/grad_norm"] == 2.0 and r["train/lr"] == pytest.approx(1e-3) for r in train)
        # The z-loss term is token-weighted like the loss: (0.01 * 3 + 0.02 * 1) / 4, then 0.02, then 0.01.
        assert [r["train/z_loss"] for r in train] == pytest.approx([0.05 / 4, 0.02, 0.01], rel=1e-12)


@pytest.mark.distributed
def test_the_largest_rank_loss_is_logged_beside_the_mean(ranks):
    for result in ranks:
        train = [r for r in result["records"] if r.get("split") == "train"]
        # Step 0: max(mean(1, 2, 3), 5); steps 1 and 2: the only rank with targets (an empty rank is no max).
        assert [r["train/loss_max"] for r in train] == [5.0, 3.0, 1.5]
        assert "nan" not in result["events"]
        assert "nan" not in result["events"]
        assert result["stats"].tokens_seen == 8 and result["stats"].loss == pytest.approx(1.5)


@pytest.mark.distributed
def test_eval_loss_is_the_token_weighted_mean(ranks):
    for result in ranks:
        (evaluation,) = [r for r in result["records"] if r.get("split") == "eval"]
        # (2 * 1 + 4 * 3) / 4 tokens = 3.5; the mean of the two ranks' means would be 3.
        assert evaluation["eval/loss"] == pytest.approx(3.5, rel=1e-12)
        assert evaluation["eval/tokens"] == 4


@pytest.mark.distributed
def test_only_rank_zero_writes_by_default(ranks):
    def without_rate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "throughput/tokens_per_s"} for r in records]

    assert len(ranks[0]["records"]) == 4
    assert without_rate(ranks[0]["default"]) == without_rate(ranks[0]["records"])
    assert ranks[1]["default"] == []


def test_a_lone_process_keeps_reporting_an_empty_mean_as_nan():
    """Without a group nothing is combined: a NaN loss is reported as it is."""
    monitor = LossMonitor()
    events = monitor.update(0, loss=NAN, tokens=0)
    assert [e.kind for e in events] == ["nan"]
