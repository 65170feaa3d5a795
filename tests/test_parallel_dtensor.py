"""DTensor tensor parallelism: a real tiny model with ``parallelize_module`` on two gloo ranks.

``ColwiseParallel`` shards ``lm_head.weight`` as ``Shard(0)`` (23 rows over 2 ranks:
torch.chunk's uneven 12 + 11). lmloss's vocab-parallel functions take that DTensor
(and the ``Shard(-1)`` logits the head returns with ``use_local_output=False``) and
find the group and the offsets themselves. Two independent truths: one process's
float64 loss on the full logits (``causal_lm_loss``, with autograd for the gradients
of ``lm_head`` and of the embedding), and torch's own ``loss_parallel()`` with
``F.cross_entropy`` on the DTensor logits in the same processes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from _dist import run_gloo
from lmloss import causal_lm_loss
from lmloss.parallel import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
    vocab_parallel_linear_token_logprobs,
)

tensor_api = pytest.importorskip("torch.distributed.tensor")  # public since torch 2.5
transformers = pytest.importorskip("transformers")

V, H, B, T = 23, 16, 2, 5
SMOOTHED = {"label_smoothing": 0.1, "z_loss": 0.01, "reduction": "sum"}


def make_model() -> Any:
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double()


def make_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, 2] = labels[1, 4] = -100
    labels_lp = torch.randint(0, V, (B, T + 1), generator=g)
    labels_lp[1, 3] = -100
    return {
        "ids": ids,
        "labels": labels,
        "labels_lp": labels_lp,
        "head": torch.randn(V, H, generator=g, dtype=torch.float64),
        "bias": torch.randn(V, generator=g, dtype=torch.float64),
        "hidden": torch.randn(B, T + 1, H, generator=g, dtype=torch.float64),
        "up_lp": torch.randn(B, T + 1, generator=g, dtype=torch.float64),
        "up_ent": torch.randn(B, T + 1, generator=g, dtype=torch.float64),
    }


# --- the worker ------------------------------------------------------------------------------------


def _grads(model: Any) -> dict[str, Any]:
    weight = model.lm_head.weight
    out = {
        "head": weight.grad.to_local().clone(),
        "head_type": type(weight.grad).__name__,
        "head_placements": str(weight.grad.placements),
        "embed": model.model.embed_tokens.weight.grad.clone(),
    }
    model.zero_grad(set_to_none=True)
    return out


def _model_calls(data: dict[str, torch.Tensor], mesh: Any) -> dict[str, Any]:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        loss_parallel,
        parallelize_module,
    )

    model = parallelize_module(make_model(), mesh, {"lm_head": ColwiseParallel(use_local_output=False)})
    ids, labels = data["ids"], data["labels"]
    results: dict[str, Any] = {"local_rows": model.lm_head.weight.to_local().shape[0]}
    # fused: the hidden states and the DTensor weight, no group and no offsets given
    hidden = model.model(ids).last_hidden_state
    loss = vocab_parallel_linear_cross_entropy(hidden, model.lm_head.weight, labels, group=None)
    loss.backward()
    results["fused"] = {"loss": loss.detach(), **_grads(model)}
    hidden = model.model(ids).last_hidden_state
    loss = vocab_parallel_linear_cross_entropy(hidden, model.lm_head.weight, labels, group=None, **SMOOTHED)
    loss.backward()
    results["fused/smoothed"] = {"loss": loss.detach(), **_grads(model)}
    # logits: the head's Shard(-1) DTensor output
    logits = model(ids).logits
    results["logits_placements"] = str(logits.placements)
    loss = vocab_parallel_cross_entropy(logits, labels, group=None)
    loss.backward()
    results["logits"] = {"loss": loss.detach(), **_grads(model)}
    # torch's own loss parallelism on the same DTensor logits
    logits = model(ids).logits
    with loss_parallel():
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
    results["torch"] = {"loss": loss.to_local().detach(), **_grads(model)}
    return results


def _logprobs_call(data: dict[str, torch.Tensor], mesh: Any) -> dict[str, Any]:
    """A head with a bias, sequence-parallel hidden states (``Shard(1)``), both outputs' gradients."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    head = torch.nn.Linear(H, V, bias=True, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(data["head"])
        head.bias.copy_(data["bias"])
    head = parallelize_module(head, mesh, ColwiseParallel())
    hidden = distribute_tensor(data["hidden"], mesh, [Shard(1)]).requires_grad_()
    out = vocab_parallel_linear_token_logprobs(
        hidden,
        head.weight,
        data["labels_lp"],
        group=None,
        bias=head.bias,
        temperature=0.8,
        with_entropy=True,
        chunk_size=3,
    )
    ((out.logprobs * data["up_lp"]).sum() + (out.entropy * data["up_ent"]).sum()).backward()
    return {
        "logprobs": out.logprobs.detach(),
        "entropy": out.entropy.detach(),
        "weight": head.weight.grad.to_local(),
        "bias": head.bias.grad.to_local(),
        "hidden": hidden.grad.to_local(),
        "hidden_placements": str(hidden.grad.placements),
        "bias_placements": str(head.bias.grad.placements),
    }


def _mesh_2d_call(data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A (dp=1, tp=2) mesh: the weight is Replicate() on dp and Shard(0) on tp."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
    weight = torch.nn.Parameter(distribute_tensor(data["head"], mesh, [Replicate(), Shard(0)]))
    hidden = data["hidden"].clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(hidden, weight, data["labels_lp"], group=None, chunk_size=4)
    loss.backward()
    return {
        "loss": loss.detach(),
        "weight": weight.grad.to_local(),
        "placements": str(weight.grad.placements),
        "hidden": hidden.grad,
    }


def _errors(data: dict[str, torch.Tensor], mesh: Any) -> list[str]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    hidden, labels = data["hidden"], data["labels_lp"]
    sharded = distribute_tensor(data["head"], mesh, [Shard(0)])
    logits = distribute_tensor(hidden @ data["head"].T, mesh, [Shard(0)])
    attempts = [
        lambda: vocab_parallel_linear_cross_entropy(
            hidden, distribute_tensor(data["head"], mesh, [Replicate()]), labels, group=None
        ),
        lambda: vocab_parallel_linear_token_logprobs(
            hidden, distribute_tensor(data["head"], mesh, [Shard(1)]), labels, group=None
        ),
        lambda: vocab_parallel_cross_entropy(logits, labels, group=None),
        lambda: vocab_parallel_linear_cross_entropy(
            distribute_tensor(hidden, mesh, [Shard(1)]), data["head"][:12], labels, group=None
        ),
        lambda: vocab_parallel_linear_cross_entropy(hidden, sharded, labels, group=None, vocab_size=V + 1),
        lambda: vocab_parallel_linear_token_logprobs(hidden, sharded, labels, group=None, bias=data["bias"]),
        # the mesh's group (or one with its ranks) and the mesh's layout, given: accepted
        lambda: vocab_parallel_linear_cross_entropy(
            hidden, sharded, labels, group=dist.group.WORLD, vocab_start=0 if dist.get_rank() == 0 else 12, vocab_size=V
        ),
    ]
    messages = []
    for attempt in attempts:
        try:
            attempt()
            messages.append("no error")
        except ValueError as error:
            messages.append(str(error))
    return messages


def _worker(rank: int, world_size: int, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    torch.use_deterministic_algorithms(True)
    mesh = init_device_mesh("cpu", (world_size,))
    return {
        "model": _model_calls(data, mesh),
        "logprobs": _logprobs_call(data, mesh),
        "mesh_2d": _mesh_2d_call(data),
        "errors": _errors(data, mesh),
    }


# --- the truths -----------------------------------------------------------------------------------


def model_truth(data: dict[str, torch.Tensor], **options: Any) -> dict[str, torch.Tensor]:
    """One process, float64, the full logits: ``causal_lm_loss`` and autograd."""
    model = make_model()
    loss = causal_lm_loss(model(data["ids"]).logits, data["labels"], **options)
    loss.backward()
    return {"loss": loss.detach(), "head": model.lm_head.weight.grad, "embed": model.model.embed_tokens.weight.grad}


def logprobs_truth(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hidden = data["hidden"].clone().requires_grad_()
    weight, bias = data["head"].clone().requires_grad_(), data["bias"].clone().requires_grad_()
    log_p = torch.log_softmax((hidden @ weight.T + bias) / 0.8, dim=-1)[:, :-1]
    targets = data["labels_lp"][:, 1:]
    valid = targets != -100
    lp = torch.where(valid, log_p.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    ent = torch.where(valid, -(log_p.exp() * log_p).sum(-1), 0.0)
    lp, ent = F.pad(lp, (1, 0)), F.pad(ent, (1, 0))  # aligned with the labels
    ((lp * data["up_lp"]).sum() + (ent * data["up_ent"]).sum()).backward()
    return {
        "logprobs": lp.detach(),
        "entropy": ent.detach(),
        "weight": weight.grad,
        "bias": bias.grad,
        "hidden": hidden.grad,
    }


@pytest.fixture(scope="module")
def launched() -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    data = make_data()
    return data, run_gloo(_worker, 2, data)


TOL = {"rtol": 1e-9, "atol": 1e-11}
ROWS = [(0, 12), (12, 23)]  # torch.chunk of 23 rows over 2 ranks


@pytest.mark.distributed
def test_the_model_is_what_colwise_parallel_makes(launched):
    _, ranks = launched
    assert [r["model"]["local_rows"] for r in ranks] == [12, 11]
    for rank in ranks:
        assert rank["model"]["logits_placements"] == "(Shard(dim=2),)"
        for name in ("fused", "logits", "torch"):
            assert rank["model"][name]["head_type"] == "DTensor"
            assert rank["model"][name]["head_placements"] == "(Shard(dim=0),)"


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["fused", "fused/smoothed", "logits", "torch"])
def test_loss_and_gradients_equal_one_process_float64(launched, name):
    data, ranks = launched
    expected = model_truth(data, **(SMOOTHED if name == "fused/smoothed" else {}))
    for rank, (start, stop) in zip(ranks, ROWS):
        got = rank["model"][name]
        torch.testing.assert_close(got["loss"], expected["loss"], **TOL)
        torch.testing.assert_close(got["head"], expected["head"][start:stop], **TOL)
        # the gradient reaches the replicated rest of the model in full, on every rank
        torch.testing.assert_close(got["embed"], expected["embed"], **TOL)


@pytest.mark.distributed
def test_lmloss_equals_torch_loss_parallel_on_the_same_processes(launched):
    _, ranks = launched
    for rank in ranks:
        ours, torchs = rank["model"]["logits"], rank["model"]["torch"]
        torch.testing.assert_close(ours["loss"], torchs["loss"], **TOL)
        torch.testing.assert_close(ours["head"], torchs["head"], **TOL)
        torch.testing.assert_close(rank["model"]["fused"]["head"], torchs["head"], **TOL)


@pytest.mark.distributed
def test_logprobs_with_a_dtensor_head_bias_and_sequence_parallel_hidden(launched):
    data, ranks = launched
    expected = logprobs_truth(data)
    pieces = [slice(0, 3), slice(3, 6)]  # Shard(1) of T + 1 = 6 positions
    for rank, (start, stop), piece in zip(ranks, ROWS, pieces):
        got = rank["logprobs"]
        torch.testing.assert_close(got["logprobs"], expected["logprobs"], **TOL)
        torch.testing.assert_close(got["entropy"], expected["entropy"], **TOL)
        torch.testing.assert_close(got["weight"], expected["weight"][start:stop], **TOL)
        torch.testing.assert_close(got["bias"], expected["bias"][start:stop], **TOL)
        assert got["bias_placements"] == "(Shard(dim=0),)" and got["hidden_placements"] == "(Shard(dim=1),)"
        torch.testing.assert_close(got["hidden"], expected["hidden"][:, piece], **TOL)


@pytest.mark.distributed
def test_a_two_dimensional_mesh_uses_the_sharding_dimension(launched):
    data, ranks = launched
    hidden = data["hidden"].clone().requires_grad_()
    weight = data["head"].clone().requires_grad_()
    loss = causal_lm_loss(hidden @ weight.T, data["labels_lp"])
    loss.backward()
    for rank, (start, stop) in zip(ranks, ROWS):
        got = rank["mesh_2d"]
        torch.testing.assert_close(got["loss"], loss.detach(), **TOL)
        torch.testing.assert_close(got["weight"], weight.grad[start:stop], **TOL)
        torch.testing.assert_close(got["hidden"], hidden.grad, **TOL)
        assert got["placements"] == "(Replicate(), Shard(dim=0))"


@pytest.mark.distributed
def test_other_layouts_get_a_clear_error(launched):
    _, ranks = launched
    for rank in ranks:
        replicated, dim1, logits_dim0, plain_weight, size, plain_bias, given = rank["errors"]
        assert given == "no error"
        assert "placements (Replicate(),)" in replicated and "expected Shard(0) on exactly one mesh" in replicated
        assert "ColwiseParallel" in replicated
        assert "placements (Shard(dim=1),)" in dim1 and "expected Shard(0)" in dim1
        assert "logits_shard is a DTensor" in logits_dim0 and "expected Shard(2)" in logits_dim0
        assert "hidden is a DTensor but weight_shard is not" in plain_weight
        assert "vocab_size=24 but the DTensor weight_shard gives 23" in size
        assert "weight_shard is a DTensor but bias is not" in plain_bias


# --- torch.chunk's uneven layout over four ranks (two ranks cannot tell it from an even split) ----------


def _four_ranks(rank: int, world_size: int, data: dict[str, torch.Tensor]) -> dict[int, dict[str, Any]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    for vocab in (10, 2):  # rows 3, 3, 3, 1 and 1, 1, 0, 0
        weight = torch.nn.Parameter(distribute_tensor(data["head"][:vocab], mesh, [Shard(0)]))
        hidden = data["hidden"].clone().requires_grad_()
        labels = data["labels_lp"] % vocab
        out = vocab_parallel_linear_token_logprobs(hidden, weight, labels, group=None, with_entropy=True)
        loss = vocab_parallel_linear_cross_entropy(hidden, weight, labels, group=None, label_smoothing=0.1)
        (loss + (out.logprobs * data["up_lp"]).sum() + (out.entropy * data["up_ent"]).sum()).backward()
        results[vocab] = {
            "rows": weight.to_local().shape[0],
            "loss": loss.detach(),
            "logprobs": out.logprobs.detach(),
            "entropy": out.entropy.detach(),
            "weight": weight.grad.to_local(),
            "hidden": hidden.grad,
        }
    return results


@pytest.mark.distributed
def test_uneven_shards_as_torch_lays_them_out_over_four_ranks():
    data = make_data()
    ranks = run_gloo(_four_ranks, 4, data)
    for vocab, rows in ((10, [3, 3, 3, 1]), (2, [1, 1, 0, 0])):
        chunks = [len(c) for c in torch.arange(vocab).chunk(4)]
        assert [r[vocab]["rows"] for r in ranks] == rows == chunks + [0] * (4 - len(chunks))
        hidden = data["hidden"].clone().requires_grad_()
        weight = data["head"][:vocab].clone().requires_grad_()
        labels = data["labels_lp"] % vocab
        logits = hidden @ weight.T
        loss = causal_lm_loss(logits, labels, label_smoothing=0.1)
        log_p = torch.log_softmax(logits, dim=-1)[:, :-1]
        lp = F.pad(log_p.gather(-1, labels[:, 1:].unsqueeze(-1)).squeeze(-1), (1, 0))
        ent = F.pad(-(log_p.exp() * log_p).sum(-1), (1, 0))
        (loss + (lp * data["up_lp"]).sum() + (ent * data["up_ent"]).sum()).backward()
        for rank in ranks:
            got = rank[vocab]
            torch.testing.assert_close(got["loss"], loss.detach(), **TOL)
            torch.testing.assert_close(got["logprobs"], lp.detach(), **TOL)
            torch.testing.assert_close(got["entropy"], ent.detach(), **TOL)
            torch.testing.assert_close(got["hidden"], hidden.grad, **TOL)
        torch.testing.assert_close(torch.cat([r[vocab]["weight"] for r in ranks]), weight.grad, **TOL)
