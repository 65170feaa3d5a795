"""Vocab-parallel token log-probs and entropy on two real gloo processes, against a float64 truth.

One launch runs every case (options, uneven and empty shards, bias, odd shapes, an
all-masked batch, static shapes, float32) and the bad-input calls; the parent computes
the truth on the full weight in float64 with PyTorch's own log_softmax and autograd,
under random upstream gradients on both outputs, and compares the log-probs, the
entropies, the (all-reduced) hidden-state gradient, the concatenated weight and bias
shard gradients and the collectives of each call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
import torch.distributed as dist

from _dist import run_gloo
from lmloss import validation
from lmloss.logprobs import TokenLogprobs
from lmloss.parallel import vocab_parallel_linear_token_logprobs
from test_parallel import CollectiveCounter

V, D = 23, 8
SHARDS = [(0, 9), (9, 23)]  # uneven: 9 and 14 rows
CHUNK = 4


def make_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    data = {
        "weight": 1.5 * torch.randn(V, D, generator=g, dtype=torch.float64),
        "bias": torch.randn(V, generator=g, dtype=torch.float64),
    }
    for shape in ((2, 6), (7,), (2, 2, 3), (3, 1)):
        key = "x".join(map(str, shape))
        data[f"hidden/{key}"] = torch.randn(*shape, D, generator=g, dtype=torch.float64)
        labels = torch.randint(0, V, shape, generator=g)
        labels[torch.rand(shape, generator=g) < 0.25] = -100
        data[f"labels/{key}"] = labels
        data[f"up_lp/{key}"] = torch.randn(shape, generator=g, dtype=torch.float64)
        data[f"up_ent/{key}"] = torch.randn(shape, generator=g, dtype=torch.float64)
    data["labels/2x6/masked"] = torch.full((2, 6), -100)
    data["labels/2x6/high"] = torch.randint(SHARDS[1][0], V, (2, 6), generator=g)  # every target on rank 1
    custom = data["labels/2x6"].clone()
    custom[custom == -100] = -1
    data["labels/2x6/custom"] = custom
    return data


def make_cases() -> list[dict[str, Any]]:
    options = [
        {},
        {"shift": False},
        {"temperature": 0.7},
        {"softcap": 2.0},
        {"temperature": 1.3, "softcap": 3.0, "bias": True},
        {"ignore_index": -1, "labels": "custom"},
        {"labels": "high", "bias": True},
        {"labels": "masked"},
    ]
    cases = []
    for entropy in (True, False):
        for i, option in enumerate(options):
            cases.append(
                {
                    "shape": "2x6",
                    "options": option,
                    "entropy": entropy,
                    "dtype": torch.float64,
                    "layout": "given" if i % 2 else "gathered",
                    "chunk": CHUNK if i % 3 else None,
                }
            )
    for shape in ("7", "2x2x3", "3x1"):  # 1-D, 3-D, T = 1 (nothing scored with shift=True)
        for shift in (True, False):
            cases.append(
                {
                    "shape": shape,
                    "options": {"shift": shift, "bias": True},
                    "entropy": True,
                    "dtype": torch.float64,
                    "layout": "gathered",
                    "chunk": 2,
                }
            )
    cases += [
        {
            "shape": "2x6",
            "options": {"temperature": 0.9, "softcap": 2.5, "bias": True},
            "entropy": True,
            "dtype": torch.float32,
            "layout": "given",
            "chunk": CHUNK,
        },
        {
            "shape": "2x6",
            "options": {"temperature": 0.8},
            "entropy": True,
            "dtype": torch.float64,
            "layout": "given",
            "chunk": CHUNK,
            "static": True,
        },
        {
            "shape": "2x6",
            "options": {"labels": "masked"},
            "entropy": True,
            "dtype": torch.float64,
            "layout": "given",
            "chunk": CHUNK,
            "static": True,
        },
        # Rank 0 holds no row of the vocabulary at all.
        {
            "shape": "2x6",
            "options": {"temperature": 0.7, "bias": True},
            "entropy": True,
            "dtype": torch.float64,
            "layout": "gathered",
            "chunk": CHUNK,
            "shards": [(0, 0), (0, V)],
        },
    ]
    return cases


def case_inputs(case: dict[str, Any], data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    key = case["shape"]
    option = dict(case["options"])
    labels = data[f"labels/{key}" + (f"/{option.pop('labels')}" if "labels" in option else "")]
    option.pop("bias", None)
    return labels, option


def _run_case(case: dict[str, Any], data: dict[str, torch.Tensor], rank: int, counter: CollectiveCounter) -> dict:
    start, stop = case.get("shards", SHARDS)[rank]
    dtype, key = case["dtype"], case["shape"]
    labels, kwargs = case_inputs(case, data)
    hidden = data[f"hidden/{key}"].to(dtype).clone().requires_grad_()
    shard = data["weight"][start:stop].to(dtype).clone().requires_grad_()
    bias = data["bias"][start:stop].to(dtype).clone().requires_grad_() if case["options"].get("bias") else None
    layout = {"vocab_start": start, "vocab_size": V} if case["layout"] == "given" else {}
    counter.take()
    with validation(not case.get("static", False)):
        out = vocab_parallel_linear_token_logprobs(
            hidden,
            shard,
            labels,
            group=dist.group.WORLD,
            bias=bias,
            with_entropy=case["entropy"],
            chunk_size=case["chunk"],
            **layout,
            **kwargs,
        )
    forward = counter.take()
    total = (out.logprobs * data[f"up_lp/{key}"].to(out.logprobs.dtype)).sum()
    if out.entropy is not None:
        total = total + (out.entropy * data[f"up_ent/{key}"].to(out.entropy.dtype)).sum()
    total.backward()
    return {
        "type": type(out),
        "logprobs": out.logprobs.detach(),
        "requires_grad": out.logprobs.requires_grad,
        "entropy": None if out.entropy is None else out.entropy.detach(),
        "hidden_grad": hidden.grad,
        "shard_grad": shard.grad,
        "bias_grad": None if bias is None else bias.grad,
        "forward_calls": forward,
        "backward_calls": counter.take(),
    }


def _bad_calls(data: dict[str, torch.Tensor], rank: int) -> list[str]:
    start, stop = SHARDS[rank]
    hidden, labels, shard = data["hidden/2x6"], data["labels/2x6"], data["weight"][start:stop]
    out_of_range = labels.clone()
    out_of_range[1, 3] = V
    attempts = [
        # a float32 shard on rank 1 only, layout gathered: the layout gather carries the flag
        lambda: vocab_parallel_linear_token_logprobs(hidden, shard.float() if rank == 1 else shard, labels, group=None),
        # a bias of the wrong size on rank 0 only, layout given: the first statistics gather carries it
        lambda: vocab_parallel_linear_token_logprobs(
            hidden,
            shard,
            labels,
            group=None,
            vocab_start=start,
            vocab_size=V,
            chunk_size=CHUNK,
            bias=torch.zeros(stop - start + (rank == 0), dtype=hidden.dtype),
        ),
        lambda: vocab_parallel_linear_token_logprobs(hidden, shard, out_of_range, group=None),
        lambda: vocab_parallel_linear_token_logprobs(hidden, shard, labels, group=None, temperature=0.0),
        lambda: vocab_parallel_linear_token_logprobs(hidden, shard, labels, group=None, chunk_size=0),
        # the group is still in step afterwards
        lambda: vocab_parallel_linear_token_logprobs(hidden, shard, labels, group=None, with_entropy=True).entropy,
    ]
    messages = []
    for attempt in attempts:
        try:
            messages.append(attempt())
        except ValueError as error:
            messages.append(str(error))
    return messages


def _worker(rank: int, world_size: int, data: dict[str, torch.Tensor], cases: list[dict[str, Any]]) -> dict:
    bad = _bad_calls(data, rank)
    with CollectiveCounter() as counter:
        results = [_run_case(case, data, rank, counter) for case in cases]
    return {"results": results, "bad": bad}


# --- the truth: float64 on the full weight, PyTorch's log_softmax, autograd -----------------------


def truth(case: dict[str, Any], data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = case["shape"]
    labels, kwargs = case_inputs(case, data)
    shift, ignore = kwargs.get("shift", True), kwargs.get("ignore_index", -100)
    temperature, softcap = kwargs.get("temperature", 1.0), kwargs.get("softcap")
    hidden = data[f"hidden/{key}"].to(case["dtype"]).double().requires_grad_()
    weight = data["weight"].to(case["dtype"]).double().requires_grad_()
    bias = data["bias"].to(case["dtype"]).double().requires_grad_()
    z = hidden @ weight.T + (bias if case["options"].get("bias") else 0.0 * bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z / temperature, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    targets = labels
    if shift:  # position t predicts labels[t + 1]; the output is aligned with the labels
        log_p, entropy, targets = log_p[..., :-1, :], entropy[..., :-1], labels[..., 1:]
    valid = targets != ignore
    picked = log_p.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    lp, ent = torch.where(valid, picked, 0.0), torch.where(valid, entropy, 0.0)
    if shift:
        pad = torch.zeros(*lp.shape[:-1], 1, dtype=lp.dtype)
        lp, ent = torch.cat([pad, lp], -1), torch.cat([pad, ent], -1)
    total = (lp * data[f"up_lp/{key}"]).sum()
    if case["entropy"]:
        total = total + (ent * data[f"up_ent/{key}"]).sum()
    grads = torch.autograd.grad(total, (hidden, weight, bias))
    return {"logprobs": lp.detach(), "entropy": ent.detach(), "hidden": grads[0], "weight": grads[1], "bias": grads[2]}


def scored(case: dict[str, Any], data: dict[str, torch.Tensor]) -> int:
    labels, kwargs = case_inputs(case, data)
    if case.get("static"):
        return labels.numel()
    if kwargs.get("shift", True):
        labels = labels[..., 1:]
    return int((labels != kwargs.get("ignore_index", -100)).sum())


@pytest.fixture(scope="module")
def launched() -> tuple[dict, list[dict], list[dict]]:
    data, cases = make_data(), make_cases()
    return data, cases, run_gloo(_worker, 2, data, cases)


@pytest.mark.distributed
def test_logprobs_entropy_and_gradients_match_the_float64_truth(launched):
    data, cases, ranks = launched
    for i, case in enumerate(cases):
        expected, where = truth(case, data), f"case {i}: {case}"
        tol = {"rtol": 1e-10, "atol": 1e-12} if case["dtype"] == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
        got = [r["results"][i] for r in ranks]
        for result in got:
            assert result["type"] is TokenLogprobs and result["requires_grad"], where
            assert result["logprobs"].dtype == (torch.float64 if case["dtype"] == torch.float64 else torch.float32)
            torch.testing.assert_close(result["logprobs"].double(), expected["logprobs"], **tol, msg=where)
            if case["entropy"]:
                torch.testing.assert_close(result["entropy"].double(), expected["entropy"], **tol, msg=where)
            else:
                assert result["entropy"] is None, where
            # the full hidden-state gradient on every rank: all-reduced inside
            torch.testing.assert_close(result["hidden_grad"].double(), expected["hidden"], **tol, msg=where)
        shards = [r["shard_grad"] for r in got]
        torch.testing.assert_close(torch.cat(shards).double(), expected["weight"], **tol, msg=where)
        if case["options"].get("bias"):
            bias = torch.cat([r["bias_grad"] for r in got]).double()
            torch.testing.assert_close(bias, expected["bias"], **tol, msg=where)


@pytest.mark.distributed
def test_the_cases_cover_what_they_claim(launched):
    """Odd shapes, an empty shard, the entropy both ways, upstream gradients that matter."""
    data, cases, ranks = launched
    assert {c["shape"] for c in cases} == {"2x6", "7", "2x2x3", "3x1"}
    assert any(c.get("shards") == [(0, 0), (0, V)] for c in cases)
    # A wrong entropy gradient would show: the entropy's upstream term changes the weight gradient.
    with_ent = truth({**cases[0], "entropy": True}, data)["weight"]
    without = truth({**cases[0], "entropy": False}, data)["weight"]
    assert float((with_ent - without).abs().max()) > 1e-2
    # rank 0 owns none of the "high" targets yet gets the softmax part of the gradient
    high = next(i for i, c in enumerate(cases) if c["options"].get("labels") == "high")
    assert float(ranks[0]["results"][high]["shard_grad"].abs().sum()) > 0


@pytest.mark.distributed
def test_all_masked_batches_give_zeros_and_zero_gradients(launched):
    _, cases, ranks = launched
    masked = [
        i
        for i, c in enumerate(cases)
        if c["options"].get("labels") == "masked" or (c["shape"] == "3x1" and c["options"]["shift"])
    ]
    assert len(masked) == 4
    for i in masked:
        for rank in ranks:
            result = rank["results"][i]
            assert float(result["logprobs"].abs().sum()) == 0.0 and not result["logprobs"].isnan().any()
            assert result["entropy"] is None or float(result["entropy"].abs().sum()) == 0.0
            for name in ("hidden_grad", "shard_grad", "bias_grad"):
                assert result[name] is None or float(result[name].abs().sum()) == 0.0, (i, name)


@pytest.mark.distributed
def test_one_gather_per_chunk_forward_one_all_reduce_backward(launched):
    data, cases, ranks = launched
    gather = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    for i, case in enumerate(cases):
        n = scored(case, data)
        labels, _ = case_inputs(case, data)
        chunk = case["chunk"] or labels.numel()  # the default chunk holds every row of these tiny inputs
        forward = ([gather] if case["layout"] == "gathered" else []) + [gather] * math.ceil(n / chunk)
        for rank in ranks:
            assert rank["results"][i]["forward_calls"] == forward, (i, case)
            assert rank["results"][i]["backward_calls"] == (["all_reduce"] if n else []), (i, case)


@pytest.mark.distributed
def test_bad_input_raises_on_every_rank(launched):
    _, _, ranks = launched
    for rank, result in enumerate(ranks):
        dtype, bias, labels, temperature, chunk, good = result["bad"]
        assert "bad input on rank 1 of the group" in dtype
        assert ("must have the same dtype" in dtype) == (rank == 1)
        assert "bad input on rank 0 of the group" in bias
        assert ("bias must be this rank's [V_r] = [9] rows" in bias) == (rank == 0)
        assert "labels[1, 3] = 23 is outside the vocabulary [0, 23)" in labels
        assert "temperature must be a finite number > 0" in temperature
        assert "chunk_size must be >= 1" in chunk
        assert isinstance(good, torch.Tensor) and good.shape == (2, 6)


def test_takes_the_options_of_linear_token_logprobs_spelled_alike():
    """Its explicit parameters as linear_token_logprobs spells them; the log-prob options
    as ``**options: Unpack[LogprobKeywords]`` (their defaults are LogprobSpec's, which
    tests/test_spec.py holds linear_token_logprobs to)."""
    import inspect

    import lmloss
    from lmloss.logprobs import LogprobSpec

    ours = inspect.signature(vocab_parallel_linear_token_logprobs).parameters
    theirs = inspect.signature(lmloss.linear_token_logprobs).parameters
    options = [f.name for f in dataclasses.fields(LogprobSpec)]
    for name, param in theirs.items():
        if name in ("weight", "backend", *options):  # the shard is weight_shard; there is one backend
            continue
        assert name in ours, name
        assert (ours[name].kind, ours[name].default, str(ours[name].annotation)) == (
            param.kind,
            param.default,
            str(param.annotation),
        ), name
    assert ours["options"].kind is inspect.Parameter.VAR_KEYWORD and not set(options) & set(ours)
    assert list(ours)[:3] == ["hidden", "weight_shard", "labels"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'with_entropie'"):
        vocab_parallel_linear_token_logprobs(
            torch.zeros(1, 2, 3), torch.zeros(4, 3), torch.zeros(1, 2, dtype=torch.long), group=None, with_entropie=True
        )
    assert ours["group"].kind is inspect.Parameter.KEYWORD_ONLY and ours["group"].default is inspect.Parameter.empty


def test_without_torch_distributed_the_error_says_so():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"need torch\.distributed initialized"):
        vocab_parallel_linear_token_logprobs(
            torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long), group=None
        )
