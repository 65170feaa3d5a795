"""Token counts across gradient accumulation and real gloo data-parallel ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import lmloss
from _dist import run_gloo
from _truth import logits_with_losses
from lmloss import causal_lm_loss, count_targets, micro_batches

# --- count_targets -------------------------------------------------------------


def test_count_targets_tokens_weights_and_sequences():
    labels = torch.tensor([[1, 2, -100, 4], [7, -100, -100, -100], [-100, -100, 3, 3]])
    assert count_targets(labels).dtype == torch.int64
    assert int(count_targets(labels)) == 2 + 0 + 2
    assert int(count_targets(labels, shift=False)) == 3 + 1 + 2
    assert int(count_targets(labels, normalize="sequence")) == 2  # row 1 has no target once shifted
    weights = torch.tensor([[9.0, 0.5, 0.5, 2.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.25, 0.0]])
    counted = count_targets(labels, token_weights=weights)
    assert counted.dtype == torch.float32 and float(counted) == 0.5 + 2.0 + 0.25 + 0.0
    # A zero-weight target is no item: the row counts as empty for sequence normalization.
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    assert int(count_targets(labels, token_weights=mask, normalize="sequence")) == 1


def test_count_targets_is_the_divisor_of_the_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 17, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 17, (3, 8), generator=g)
    labels[torch.rand(3, 8, generator=g) < 0.4] = -100
    weights = torch.rand(3, 8, generator=g, dtype=torch.float64)
    for kwargs in ({}, {"token_weights": weights}, {"normalize": "sequence"}, {"shift": False}):
        n = count_targets(labels, **kwargs)
        torch.testing.assert_close(
            causal_lm_loss(logits, labels, reduction="sum", **kwargs) / n.double(),
            causal_lm_loss(logits, labels, **kwargs),
        )


def test_count_targets_bad_input():
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        count_targets(torch.ones(3))
    with pytest.raises(ValueError, match="at least 1-D"):
        count_targets(torch.tensor(3))
    with pytest.raises(ValueError, match="token_weights has shape"):
        count_targets(torch.ones(2, 3, dtype=torch.long), token_weights=torch.ones(3))
    with pytest.raises(ValueError, match="normalize='rows'"):
        count_targets(torch.ones(3, dtype=torch.long), normalize="rows")  # type: ignore[arg-type]  # on purpose


# --- micro_batches: accumulation gives the big-batch gradient ---------------------------


def tiny_qwen2(seed: int = 0) -> torch.nn.Module:
    """A real transformers Qwen2 model, built from a small config (nothing downloaded)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config).double()


def uneven_step(n_micro: int = 8, seq_len: int = 6, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Micro-batches with very different target counts (one has none at all)."""
    g = torch.Generator().manual_seed(seed)
    step = []
    for i in range(n_micro):
        input_ids = torch.randint(0, 32, (2, seq_len), generator=g)
        labels = input_ids.clone()
        labels[torch.rand(2, seq_len, generator=g) < i / n_micro] = -100
        if i == 3:
            labels[:] = -100
        step.append({"input_ids": input_ids, "labels": labels})
    return step


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def big_batch_grads(step: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    model = tiny_qwen2()
    input_ids = torch.cat([mb["input_ids"] for mb in step])
    labels = torch.cat([mb["labels"] for mb in step])
    causal_lm_loss(model(input_ids).logits, labels).backward()
    return grads(model)


def test_accumulated_micro_batches_equal_one_big_batch():
    step = uneven_step()
    model = tiny_qwen2()
    yielded = list(micro_batches(step))
    assert [mb.index for mb in yielded] == list(range(8)) and [mb.is_last for mb in yielded][-2:] == [False, True]
    assert all(
        int(mb.num_items_in_batch) == int(count_targets(torch.cat([s["labels"] for s in step]))) for mb in yielded
    )
    for mb in yielded:
        loss = causal_lm_loss(
            model(mb.batch["input_ids"]).logits, mb.batch["labels"], num_items_in_batch=mb.num_items_in_batch
        )
        (loss * mb.loss_scale).backward()
    expected = big_batch_grads(step)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, expected[name], rtol=1e-10, atol=1e-12)


def test_mean_of_micro_batch_means_is_wrong():
    """The transformers 2024 bug, shown on the same data: the test above can fail."""
    step = uneven_step()
    model = tiny_qwen2()
    for mb in step:
        labels = mb["labels"]
        if int(count_targets(labels)):
            (causal_lm_loss(model(mb["input_ids"]).logits, labels) / len(step)).backward()
    expected = big_batch_grads(step)
    worst = max(float((g - expected[n]).abs().max() / expected[n].abs().max()) for n, g in grads(model).items())
    assert worst > 0.01


def test_micro_batches_accept_labels_tensors_and_weights():
    labels = [torch.tensor([[1, 2, 3]]), torch.tensor([[1, -100, 3]])]
    assert [int(mb.num_items_in_batch) for mb in micro_batches(labels)] == [3, 3]
    step = [{"labels": t, "w": torch.ones_like(t) * 0.5} for t in labels]
    assert float(next(micro_batches(step, weights_key="w")).num_items_in_batch) == 1.5
    with pytest.raises(ValueError, match="got no micro-batch"):
        list(micro_batches([]))
    with pytest.raises(ValueError, match="no 'labels' entry"):
        list(micro_batches([{"targets": labels[0]}]))
    with pytest.raises(TypeError, match="must be a mapping"):
        list(micro_batches([[1, 2, 3]]))


# --- real gloo processes -------------------------------------------------------------


def _worked_example_worker(rank: int, world_size: int) -> dict[str, float]:
    """Rank 0 holds micro-batch A (losses 1,1,1), rank 1 holds B (loss 3)."""
    if rank == 0:
        labels = torch.tensor([[-100, 5, 6, 7]])
        logits = logits_with_losses([5, 6, 7, 0], [1.0, 1.0, 1.0, 1.0], 10)[None]
    else:
        labels = torch.tensor([[-100, -100, -100, 8]])
        logits = logits_with_losses([0, 0, 8, 0], [2.0, 2.0, 3.0, 2.0], 10)[None]
    n = count_targets(labels, group=dist.group.WORLD)
    (mb,) = micro_batches([labels], group=dist.group.WORLD)
    loss = causal_lm_loss(logits, labels, num_items_in_batch=mb.num_items_in_batch) * mb.loss_scale
    averaged = loss.detach().clone()
    dist.all_reduce(averaged)  # what DDP does to gradients: mean over ranks
    averaged /= world_size
    local_mean = causal_lm_loss(logits, labels).detach().clone()
    dist.all_reduce(local_mean)
    return {"count": int(n), "loss": float(loss), "averaged": float(averaged), "mean_of_means": float(local_mean) / 2}


@pytest.mark.distributed
def test_worked_example_over_two_gloo_processes():
    results = run_gloo(_worked_example_worker, 2)
    assert [r["count"] for r in results] == [4, 4]
    assert [r["loss"] for r in results] == pytest.approx([1.5, 1.5], rel=1e-12)  # 3/4*2 and 3/4*2
    assert all(math.isclose(r["averaged"], 1.5, rel_tol=1e-12) for r in results)
    assert all(math.isclose(r["mean_of_means"], 2.0, rel_tol=1e-12) for r in results)


def _ddp_worker(rank: int, world_size: int, step: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each rank trains on its half of the micro-batches through a real DDP model."""
    model = DistributedDataParallel(tiny_qwen2())
    mine = step[rank::world_size]
    for mb in micro_batches(mine, group=dist.group.WORLD):

        def backward(mb=mb):
            logits = model(mb.batch["input_ids"]).logits
            loss = causal_lm_loss(logits, mb.batch["labels"], num_items_in_batch=mb.num_items_in_batch)
            (loss * mb.loss_scale).backward()

        if mb.is_last:
            backward()  # gradients are all-reduced (averaged) here
        else:
            with model.no_sync():
                backward()
    return grads(model.module)


@pytest.mark.distributed
def test_ddp_over_two_gloo_processes_equals_one_big_batch():
    step = uneven_step(n_micro=6)
    # Rank 1 gets micro-batches 1, 3, 5; micro-batch 3 has no target at all.
    results = run_gloo(_ddp_worker, 2, step)
    expected = big_batch_grads(step)
    for rank_grads in results:
        for name, g in rank_grads.items():
            torch.testing.assert_close(g, expected[name], rtol=1e-10, atol=1e-12)


def test_validation_context_is_restored():
    with lmloss.validation(False):
        with lmloss.validation(True):
            pass
        from lmloss._validation import value_checks_enabled

        assert not value_checks_enabled()
    assert value_checks_enabled()


def test_policy_loss_counts_tokens_or_every_sequence() -> None:
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    for loss_type in ("dapo", "cispo", "bnpo", "vespo"):
        assert int(count_targets(mask, loss_type=loss_type)) == 3
        assert int(count_targets(mask.bool(), loss_type=loss_type)) == 3
    for loss_type in ("grpo", "sapo", "dr_grpo", "luspo"):
        assert int(count_targets(mask, loss_type=loss_type)) == 3  # the empty row counts: TRL averages over B
    steps = [mask, mask[:1]]
    assert [int(mb.num_items_in_batch) for mb in micro_batches(steps, loss_type="dapo")] == [5, 5]
    assert [int(mb.num_items_in_batch) for mb in micro_batches(steps, loss_type="vespo")] == [5, 5]
    assert [int(mb.num_items_in_batch) for mb in micro_batches(steps, loss_type="grpo")] == [4, 4]
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        count_targets(mask, loss_type="ppo")
    with pytest.raises(ValueError, match=r"\[B, T\] mask"):
        count_targets(mask[0], loss_type="dapo")


def test_normalize_is_a_deprecated_alias() -> None:
    import importlib
    import sys

    sys.modules.pop("lmloss.normalize", None)
    with pytest.warns(DeprecationWarning, match="lmloss.accounting"):
        module = importlib.import_module("lmloss.normalize")
    assert module.count_targets is lmloss.accounting.count_targets
    assert module.micro_batches is lmloss.accounting.micro_batches
    assert module.MicroBatch is lmloss.accounting.MicroBatch
