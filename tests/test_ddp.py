"""Data parallelism for real: two gloo processes training a transformers Qwen2 model equal one
process training on the concatenated batch, gradient for gradient.

Each rank holds uneven micro-batches (different target counts, one with none); every
micro-batch's loss is its sum divided by the step's global target count
(``lmloss.micro_batches(..., group=...)``) times the world size (``loss_scale``), and
gradients are synchronised only on the last micro-batch (``no_sync()`` before it).
The truth is the plain mean loss of the whole batch in one process: one forward, one
backward. Gradients are compared, not parameters after an AdamW step: some gradients are
zero in exact arithmetic (a key-projection bias: softmax ignores a shift shared by every
score), and AdamW's first step (about ``lr * g / |g|``) turns their float noise into a
full step that differs from one processor to another. One launch runs DDP, DDP with a rank that has no target
at all, and FSDP2 (``fully_shard``), and feeds ``LossMonitor`` along the way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from _dist import run_gloo
from lmloss import causal_lm_loss, count_targets, micro_batches
from lmloss.monitor import LossMonitor

VOCAB, SEQ, ROWS = 32, 8, 2
Step = list[dict[str, torch.Tensor]]


def tiny_qwen2() -> torch.nn.Module:
    """A real transformers Qwen2 causal LM from a small config, float32, same weights on every call."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config).float()


def fully_shard_fn() -> Callable[..., Any] | None:
    """FSDP2's ``fully_shard``: public in torch.distributed.fsdp since torch 2.6, before that
    in torch.distributed._composable.fsdp. (FSDP1 needs an accelerator: it refuses CPU.)"""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # type: ignore[no-redef]  # older torch
        except ImportError:
            return None
    return fully_shard


def make_steps(seed: int = 0) -> dict[str, list[Step]]:
    """Per scenario, each rank's micro-batches; target counts differ from rank to rank."""
    g = torch.Generator().manual_seed(seed)

    def micro(drop: float, none: bool = False) -> dict[str, torch.Tensor]:
        input_ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
        labels = input_ids.clone()
        labels[torch.rand(ROWS, SEQ, generator=g) < drop] = -100
        if none:
            labels[:] = -100
        return {"input_ids": input_ids, "labels": labels}

    uneven = [[micro(0.0), micro(0.2), micro(0.1)], [micro(0.7), micro(0.0, none=True), micro(0.5)]]
    masked_rank = [[micro(0.1), micro(0.3), micro(0.0)], [micro(0.0, none=True) for _ in range(3)]]
    return {"uneven": uneven, "masked_rank": masked_rank}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (FSDP2's sharded DTensors gathered: a collective, same order on every rank)."""
    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name] = grad.detach().clone()
    return out


# --- one process, the whole batch ---------------------------------------------------------------


def big_batch_step(ranks: list[Step]) -> tuple[dict[str, torch.Tensor], float]:
    """The truth: the mean loss over every target of the step, in one process."""
    model = tiny_qwen2()
    everything = [mb for rank in ranks for mb in rank]
    input_ids = torch.cat([mb["input_ids"] for mb in everything])
    labels = torch.cat([mb["labels"] for mb in everything])
    loss = causal_lm_loss(model(input_ids).logits, labels)
    loss.backward()
    return grads(model), float(loss.detach())


# --- two processes -------------------------------------------------------------------------------


def _train_step(
    model: torch.nn.Module, mine: Step, skip_sync: Callable[[], Any], naive: bool = False
) -> dict[str, Any]:
    """The gradient of one step over this rank's micro-batches; synchronise on the last one only.

    ``naive``: the usual mistake instead (each micro-batch's own mean, averaged), to show
    that the comparison can fail.
    """
    losses, step_sum = [], torch.zeros((), dtype=torch.float64)
    for mb in micro_batches(mine, group=dist.group.WORLD):
        with contextlib.nullcontext() if mb.is_last else skip_sync():
            logits = model(mb.batch["input_ids"]).logits
            if naive:
                loss = causal_lm_loss(logits, mb.batch["labels"])
                (loss / len(mine)).backward()
            else:
                loss = causal_lm_loss(logits, mb.batch["labels"], num_items_in_batch=mb.num_items_in_batch)
                (loss * mb.loss_scale).backward()
        losses.append((float(loss.detach()), loss.requires_grad))
        step_sum += loss.detach().double() * mb.num_items_in_batch  # this rank's sum of target losses
    tokens = sum(int(count_targets(mb["labels"])) for mb in mine)
    return {"losses": losses, "sum": float(step_sum), "tokens": tokens, "global_tokens": int(mb.num_items_in_batch)}


def _monitored(rank_step: dict[str, Any]) -> dict[str, Any]:
    """What LossMonitor logs from every rank's *local* mean loss and count."""
    record: dict[str, Any] = {}
    sink = type("Sink", (), {"write": lambda self, r: record.update(r), "close": lambda self: None})()
    monitor = LossMonitor(group=dist.group.WORLD, sinks=[sink], write_sinks=True)
    tokens = rank_step["tokens"]
    # A rank without targets has no mean (0/0 is NaN): it must add nothing to the global loss.
    local_mean = rank_step["sum"] / tokens if tokens else float("nan")
    monitor.update(0, loss=local_mean, tokens=tokens)
    monitor.close()
    return record


@contextlib.contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _worker(rank: int, world_size: int, steps: dict[str, list[Step]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scenario, ranks in steps.items():
        model = DistributedDataParallel(tiny_qwen2())
        step = _train_step(model, ranks[rank], model.no_sync)
        out[scenario] = {"grads": grads(model.module), "step": step, "monitor": _monitored(step)}
    model = DistributedDataParallel(tiny_qwen2())
    _train_step(model, steps["uneven"][rank], model.no_sync, naive=True)
    out["naive"] = {"grads": grads(model.module)}
    fully_shard = fully_shard_fn()
    if fully_shard is not None:
        model = tiny_qwen2()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        step = _train_step(model, steps["uneven"][rank], lambda: _fsdp_no_sync(model))
        out["fsdp"] = {"grads": grads(model), "step": step}
    return out


@pytest.fixture(scope="module")
def launched() -> tuple[dict[str, list[Step]], list[dict[str, Any]]]:
    steps = make_steps()
    return steps, run_gloo(_worker, 2, steps)


@pytest.fixture(scope="module")
def truths(launched) -> dict[str, tuple[dict[str, torch.Tensor], float]]:
    """The one-process step of each scenario (one thread: a tiny model on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {scenario: big_batch_step(ranks) for scenario, ranks in launched[0].items()}
    finally:
        torch.set_num_threads(threads)


def assert_same_grads(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    # Float32 sums in another order differ by about 1e-7 of the gradient's scale; a gradient
    # that is zero in exact arithmetic is such noise, so the absolute tolerance is relative
    # to the largest gradient. A wrong scale or a lost rank is off by a fraction of a gradient.
    assert got.keys() == expected.keys()
    scale = max(float(g.abs().max()) for g in expected.values())
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5 * scale, msg=f"{what}: {name}")


# --- the tests ------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_ddp_with_uneven_counts_and_micro_batches_equals_one_big_batch(launched, truths):
    _, ranks = launched
    expected, _ = truths["uneven"]
    counts = [r["uneven"]["step"]["tokens"] for r in ranks]
    assert counts[0] != counts[1] and all(r["uneven"]["step"]["global_tokens"] == sum(counts) for r in ranks)
    for rank in ranks:
        assert_same_grads(rank["uneven"]["grads"], expected, "DDP")
    # The same run with a mean of micro-batch means ends elsewhere: the comparison can fail.
    with pytest.raises(AssertionError):
        assert_same_grads(ranks[0]["naive"]["grads"], expected, "naive")


@pytest.mark.distributed
def test_a_rank_without_any_target_neither_hangs_nor_changes_the_result(launched, truths):
    steps, ranks = launched
    expected, _ = truths["masked_rank"]
    assert int(count_targets(torch.cat([mb["labels"] for mb in steps["masked_rank"][1]]))) == 0
    # Its losses are an exact 0.0 still attached to the graph, so DDP's all-reduce ran.
    assert ranks[1]["masked_rank"]["step"]["losses"] == [(0.0, True)] * 3
    for rank in ranks:
        assert_same_grads(rank["masked_rank"]["grads"], expected, "DDP, rank 1 all-masked")


@pytest.mark.distributed
def test_fsdp2_equals_one_big_batch(launched, truths):
    _, ranks = launched
    if fully_shard_fn() is None:
        pytest.skip(f"torch {torch.__version__} has no FSDP2 fully_shard (FSDP1 needs an accelerator)")
    expected, _ = truths["uneven"]
    for rank in ranks:
        assert_same_grads(rank["fsdp"]["grads"], expected, "FSDP2")


@pytest.mark.distributed
def test_monitor_logs_the_big_batch_loss(launched, truths):
    _, ranks = launched
    for scenario in ("uneven", "masked_rank"):
        _, big_loss = truths[scenario]
        total = sum(r[scenario]["step"]["tokens"] for r in ranks)
        for rank in ranks:
            record = rank[scenario]["monitor"]
            assert record["train/tokens"] == total
            assert record["train/loss"] == pytest.approx(big_loss, rel=1e-5), scenario
