"""Vocab-parallel cross-entropy on two real gloo processes, against a float64 one-process truth.

One launch runs every case (options x reductions x both entry points x dtypes, uneven
shards, a shard with no target, an all-masked batch, DFT and focal token losses, bad
input, bad input on one rank only); the parent process computes the truth with
PyTorch's own cross_entropy on the full logits (``_truth.naive_loss``) and autograd,
or, for the DFT/focal forms, with ``lmloss.causal_lm_loss`` on the full float64 logits
(whose token losses tests/test_reference.py checks against the papers' formulas), and
compares losses, the hidden-state gradient, the concatenated weight-shard gradients,
the logits-shard gradients and the number of collectives.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist

import lmloss._shard_group as shard_group
from _dist import run_gloo
from _truth import naive_loss
from lmloss import causal_lm_loss, validation
from lmloss.parallel import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
    vocab_shard_bounds,
)

V, D, B, T = 23, 8, 2, 6
SHARDS = [(0, 9), (9, 23)]  # uneven on purpose: 9 and 14 rows
CHUNK = 4
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "gather",
    "scatter",
)


# --- data and cases -------------------------------------------------------------------------


def make_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = 1.5 * torch.randn(V, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2] = labels[1, 4] = -100
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    weights[1, 1] = 0.0
    high = torch.randint(SHARDS[1][0], V, (B, T), generator=g)  # every target on rank 1's shard
    high[0, 3] = -100
    custom = labels.clone()
    custom[custom == -100] = -1
    classes = torch.rand(V, generator=g, dtype=torch.float64) * 2
    classes[labels[0, 1]] = 0.0  # a target whose class weighs nothing (its smoothing term still counts)
    zero_on_targets = classes.clone()
    zero_on_targets[labels[labels != -100]] = 0.0  # the mean's divisor is 0
    return {
        "hidden": hidden,
        "weight": weight,
        "weights": weights,
        "classes/some": classes,
        "classes/zero_on_targets": zero_on_targets,
        "upstream": torch.randn(B, T, generator=g, dtype=torch.float64),
        "labels/default": labels,
        "labels/high": high,
        "labels/custom": custom,
        "labels/masked": torch.full((B, T), -100),
    }


OPTION_SETS: list[dict[str, Any]] = [
    {},
    {"shift": False},
    {"label_smoothing": 0.1},
    {"z_loss": 0.02},
    {"softcap": 2.0},
    {"token_weights": "weights"},
    {"normalize": "sequence"},
    {"num_items_in_batch": 37.0},
    {"ignore_index": -1, "labels": "custom"},
    {
        "label_smoothing": 0.2,
        "z_loss": 0.05,
        "softcap": 3.0,
        "token_weights": "weights",
        "normalize": "sequence",
        "num_items_in_batch": 5,
    },
]
ALL_ON = OPTION_SETS[-1]
# DFT and focal token losses, alone and with every option that interacts with the weight
# (smoothing: the weight uses the hard target's p; z-loss: not weighted; softcap: p of the
# capped logits; token weights and normalization: multiply on top).
TOKEN_LOSS_SETS: list[dict[str, Any]] = [
    {"token_loss": "dft"},
    {"token_loss": "dft", "label_smoothing": 0.1, "z_loss": 0.02, "softcap": 3.0, "token_weights": "weights"},
    {"token_loss": "focal"},
    {
        "token_loss": "focal",
        "focal_gamma": 0.5,
        "label_smoothing": 0.2,
        "token_weights": "weights",
        "normalize": "sequence",
        "num_items_in_batch": 5,
    },
    {"token_loss": "focal_attached"},
    {
        "token_loss": "focal_attached",
        "focal_gamma": 1.5,
        "label_smoothing": 0.1,
        "z_loss": 0.05,
        "softcap": 2.0,
        "token_weights": "weights",
        "shift": False,
    },
    {
        "token_loss": "focal_attached",
        "focal_gamma": 0.5,
        "normalize": "sequence",
        "ignore_index": -1,
        "labels": "custom",
    },
    {"token_loss": "focal_attached", "focal_gamma": 0.0, "label_smoothing": 0.1},
]
ATTACHED_ALL_ON = TOKEN_LOSS_SETS[5]
# Class weights ([V], all of them on every rank), alone and with what interacts with them:
# smoothing (the shard's weighted logit sum), z-loss (weighted by the target's class),
# token weights and normalization (the count), num_items_in_batch, the attached focal loss.
CLASS_WEIGHT_SETS: list[dict[str, Any]] = [
    {"class_weights": "some"},
    {"class_weights": "some", "label_smoothing": 0.1},
    {
        "class_weights": "some",
        "label_smoothing": 0.7,
        "z_loss": 0.02,
        "softcap": 3.0,
        "token_weights": "weights",
        "normalize": "sequence",
    },
    {
        "class_weights": "some",
        "label_smoothing": 0.2,
        "num_items_in_batch": 5,
        "token_loss": "focal_attached",
        "focal_gamma": 1.5,
        "labels": "high",
    },
    {"class_weights": "zero_on_targets", "label_smoothing": 0.1},
]


def make_cases() -> list[dict[str, Any]]:
    cases = []
    for reduction in ("mean", "sum", "none"):
        for i, options in enumerate(OPTION_SETS):
            for api in ("linear", "logits"):
                layout = "given" if i % 2 else "gathered"
                cases.append(
                    {
                        "api": api,
                        "reduction": reduction,
                        "options": options,
                        "layout": layout,
                        "dtype": torch.float64,
                        "chunk": CHUNK if i % 3 else None,
                    }
                )
        for api in ("linear", "logits"):
            cases.append(
                {
                    "api": api,
                    "reduction": reduction,
                    "options": ALL_ON,
                    "layout": "gathered",
                    "dtype": torch.float32,
                    "chunk": CHUNK,
                }
            )
            cases.append(
                {
                    "api": api,
                    "reduction": reduction,
                    "options": ALL_ON,
                    "layout": "given",
                    "dtype": torch.bfloat16,
                    "chunk": CHUNK,
                }
            )
            cases.append(
                {
                    "api": api,
                    "reduction": reduction,
                    "options": {"labels": "high", "label_smoothing": 0.1},
                    "layout": "given",
                    "dtype": torch.float64,
                    "chunk": CHUNK,
                }
            )
            cases.append(
                {
                    "api": api,
                    "reduction": reduction,
                    "options": {"labels": "masked", "z_loss": 0.1},
                    "layout": "given",
                    "dtype": torch.float64,
                    "chunk": CHUNK,
                }
            )
            cases.append(
                {
                    "api": api,
                    "reduction": reduction,
                    "options": {"labels": "masked"},
                    "layout": "gathered",
                    "dtype": torch.float32,
                    "chunk": None,
                }
            )
            cases.append(
                {
                    "api": api,
                    "reduction": reduction,
                    "options": ALL_ON,
                    "layout": "given",
                    "dtype": torch.float64,
                    "chunk": CHUNK,
                    "static": True,
                }
            )
    for reduction in ("mean", "sum", "none"):
        for i, options in enumerate(TOKEN_LOSS_SETS):
            for api in ("linear", "logits"):
                cases.append(
                    {
                        "api": api,
                        "reduction": reduction,
                        "options": options,
                        "layout": "given" if i % 2 else "gathered",
                        "dtype": torch.float64,
                        "chunk": CHUNK if i % 3 else None,
                    }
                )
        for api in ("linear", "logits"):
            cases.append(
                {
                    "api": api,
                    "reduction": reduction,
                    "options": ATTACHED_ALL_ON,
                    "layout": "gathered",
                    "dtype": torch.float32,
                    "chunk": CHUNK,
                }
            )
            cases.append(
                {
                    "api": api,
                    "reduction": reduction,
                    "options": ATTACHED_ALL_ON,
                    "layout": "given",
                    "dtype": torch.float64,
                    "chunk": CHUNK,
                    "static": True,
                }
            )
            # Rank 0 owns no target: it gets only the softmax parts of the w and k terms.
            cases.append(
                {
                    "api": api,
                    "reduction": reduction,
                    "options": {"labels": "high", "token_loss": "focal_attached", "label_smoothing": 0.1},
                    "layout": "given",
                    "dtype": torch.float64,
                    "chunk": CHUNK,
                }
            )
    for reduction in ("mean", "sum", "none"):
        for i, options in enumerate(CLASS_WEIGHT_SETS):
            for api in ("linear", "logits"):
                cases.append(
                    {
                        "api": api,
                        "reduction": reduction,
                        "options": options,
                        "layout": "given" if i % 2 else "gathered",
                        "dtype": torch.float64,
                        "chunk": CHUNK if i % 3 else None,
                    }
                )
        for api in ("linear", "logits"):
            cases.append(
                {
                    "api": api,
                    "reduction": reduction,
                    "options": CLASS_WEIGHT_SETS[2],
                    "layout": "given",
                    "dtype": torch.float32,
                    "chunk": CHUNK,
                    "static": True,
                }
            )
    # Rank 0 holds no row at all (an extreme of uneven shards).
    for api in ("linear", "logits"):
        cases.append(
            {
                "api": api,
                "reduction": "mean",
                "options": {"label_smoothing": 0.1, "z_loss": 0.01},
                "layout": "gathered",
                "dtype": torch.float64,
                "chunk": CHUNK,
                "shards": [(0, 0), (0, V)],
            }
        )
    # Uneven shards with the default chunk size must still run the same number of chunks.
    cases.append(
        {
            "api": "linear",
            "reduction": "mean",
            "options": {},
            "layout": "given",
            "dtype": torch.float64,
            "chunk": None,
            "tiny_budget": True,
        }
    )
    return cases


def resolve(options: dict[str, Any], data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Labels and loss options of a case (weights in float64: the losses take them as constants)."""
    kwargs = {k: v for k, v in options.items() if k != "labels"}
    if kwargs.get("token_weights") == "weights":
        kwargs["token_weights"] = data["weights"]
    if "class_weights" in kwargs:
        kwargs["class_weights"] = data[f"classes/{kwargs['class_weights']}"]
    return data[f"labels/{options.get('labels', 'default')}"], kwargs


# --- the worker: two ranks, one shard each ---------------------------------------------------


class CollectiveCounter:
    """Counts the outermost torch.distributed collective calls (a wrapper calling another counts once)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._depth = 0
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> CollectiveCounter:
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                self._saved[name] = original
                setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)

    def _wrap(self, name: str, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:
                self.calls.append(name)
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


def _run_case(case: dict[str, Any], data: dict[str, torch.Tensor], rank: int, counter: CollectiveCounter) -> dict:
    start, stop = case.get("shards", SHARDS)[rank]
    dtype = case["dtype"]
    labels, kwargs = resolve(case["options"], data)
    layout = {"vocab_start": start, "vocab_size": V} if case["layout"] == "given" else {}
    hidden = data["hidden"].to(dtype).clone().requires_grad_()
    # The logits form sizes its chunks locally: a tiny budget gives 6-row chunks on rank 0
    # and 4-row chunks on rank 1 (it gathers once per call whatever the chunks).
    chunk_bytes = 4 * 14 * 8 if case["chunk"] else shard_group.CHUNK_BYTES
    min_rows = shard_group.MIN_CHUNK_ROWS
    if case.get("tiny_budget"):
        # The fused form's default chunk then follows from the hidden states' own size:
        # 12 rows * 8 * 8 bytes over 8 bytes * ceil(23 / 2) columns = 8 rows on *both* ranks.
        chunk_bytes, min_rows = 1, 1
    counter.take()
    with (
        validation(not case.get("static", False)),
        mock.patch.object(shard_group, "CHUNK_BYTES", chunk_bytes),
        mock.patch.object(shard_group, "MIN_CHUNK_ROWS", min_rows),
    ):
        if case["api"] == "linear":
            shard = data["weight"][start:stop].to(dtype).clone().requires_grad_()
            loss = vocab_parallel_linear_cross_entropy(
                hidden,
                shard,
                labels,
                group=dist.group.WORLD,
                reduction=case["reduction"],
                chunk_size=case["chunk"],
                **layout,
                **kwargs,
            )
        else:
            full = (data["hidden"] @ data["weight"].T).to(dtype)
            shard = full[..., start:stop].clone().requires_grad_()
            loss = vocab_parallel_cross_entropy(
                shard, labels, group=dist.group.WORLD, reduction=case["reduction"], **layout, **kwargs
            )
    forward_calls = counter.take()
    if case["reduction"] == "none":
        (loss * data["upstream"].to(dtype)).sum().backward()
    else:
        loss.backward()
    return {
        "loss": loss.detach(),
        "dtype": loss.dtype,
        "requires_grad": loss.requires_grad,
        "hidden_grad": hidden.grad,
        "shard_grad": shard.grad,
        "forward_calls": forward_calls,
        "backward_calls": counter.take(),
    }


def _errors(data: dict[str, torch.Tensor], rank: int) -> list[str]:
    """Bad input raises on every rank alike (so no rank waits in a collective for the other)."""
    start, stop = SHARDS[rank]
    hidden, shard = data["hidden"], data["weight"][start:stop]
    labels = data["labels/default"].clone()
    labels[1, 2] = V
    attempts = [
        lambda: vocab_parallel_linear_cross_entropy(hidden, shard, labels, group=None),
        # rank 1 claims to start at 10: a gap at row 9, seen by both after the gather
        lambda: vocab_parallel_linear_cross_entropy(
            hidden, shard, data["labels/default"], group=None, vocab_start=start if rank == 0 else 10
        ),
        lambda: vocab_parallel_cross_entropy(hidden @ shard.T, data["labels/default"], group=None, vocab_size=V + 1),
        lambda: vocab_parallel_linear_cross_entropy(
            hidden, shard.float(), data["labels/default"], group=None, vocab_start=start, vocab_size=V
        ),
        lambda: vocab_parallel_linear_cross_entropy(
            hidden, shard, data["labels/default"], group=None, vocab_start=start, vocab_size=V, chunk_size=0
        ),
        # class weights are all [V] of them on every rank, not the rank's shard
        lambda: vocab_parallel_linear_cross_entropy(
            hidden, shard, data["labels/default"], group=None, class_weights=data["classes/some"][start:stop]
        ),
        lambda: vocab_parallel_cross_entropy(
            hidden @ shard.T,
            data["labels/default"],
            group=None,
            vocab_start=start,
            vocab_size=V,
            class_weights=-data["classes/some"],
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


# Bad input on ONE rank: (what, bad rank, the bad rank's error, collectives of the call on
# every rank). Each call passes the bad argument on one rank and the right one elsewhere.
ONE_RANK_BAD = [
    ("linear/gathered: a float32 shard", 1, "must have the same dtype", 1),
    ("linear/given: a shard with the wrong D", 1, "weight_shard must have shape [V_r, D]", 1),
    ("linear/given: a shard on another device", 0, "weight_shard is on meta but hidden is on cpu", 1),
    ("linear/given: a shard that does not fit", 1, "does not fit in a vocabulary of vocab_size=23", 1),
    ("linear/gathered: a weight that is not a tensor", 0, "weight_shard must be a torch.Tensor", 1),
    ("logits/given: wrong leading shape", 0, "leading dimensions must match labels", 1),
    ("logits/gathered: integer logits", 1, "must be a floating-point tensor", 1),
    ("logits/given: integer logits, reduction none", 1, "must be a floating-point tensor", 1),
]
BAD_TIMEOUT_S = 30  # a regression (one rank waiting for the other) fails after this instead of hanging


def _one_rank_bad_calls(data: dict[str, torch.Tensor], rank: int, group: Any) -> dict[str, Any]:
    start, stop = SHARDS[rank]
    hidden, labels, masked = data["hidden"], data["labels/default"], data["labels/masked"]
    shard = data["weight"][start:stop]
    logits = (hidden @ data["weight"].T)[..., start:stop]
    given = {"vocab_start": start, "vocab_size": V}

    def linear(bad: int, bad_shard: Any, **kwargs: Any) -> torch.Tensor:
        mine = bad_shard if rank == bad else shard
        return vocab_parallel_linear_cross_entropy(
            hidden, mine, kwargs.pop("labels", labels), group=group, chunk_size=CHUNK, **kwargs
        )

    def logits_ce(bad: int, bad_logits: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return vocab_parallel_cross_entropy(bad_logits if rank == bad else logits, labels, group=group, **kwargs)

    no_fit = {"vocab_start": start + 1 if rank == 1 else start, "vocab_size": V}
    return {
        ONE_RANK_BAD[0][0]: lambda: linear(1, shard.float(), token_loss="focal"),
        ONE_RANK_BAD[1][0]: lambda: linear(1, shard[:, :-1], **given),
        ONE_RANK_BAD[2][0]: lambda: linear(0, shard.to("meta"), token_loss="dft", **given),
        ONE_RANK_BAD[3][0]: lambda: linear(1, shard, **no_fit),
        ONE_RANK_BAD[4][0]: lambda: linear(0, shard.tolist()),
        ONE_RANK_BAD[5][0]: lambda: logits_ce(0, logits[:, :-1], **given),
        ONE_RANK_BAD[6][0]: lambda: logits_ce(1, logits.long()),
        ONE_RANK_BAD[7][0]: lambda: logits_ce(1, logits.long(), reduction="none", **given),
        # Documented corners: with no scored token and the layout given there is no collective
        # at all (only the bad rank raises, nobody waits) ...
        "masked/given": lambda: linear(1, shard.float(), labels=masked, **given),
        # ... and value checks off: the flag is still read on CPU collectives (no device sync).
        "static/given": lambda: _static(lambda: linear(1, shard.float(), **given)),
        # The group is still in step afterwards: a good call on it.
        "good": lambda: linear(-1, shard, token_loss="focal_attached"),
    }


def _static(call: Any) -> torch.Tensor:
    with validation(False):
        return call()


def _one_rank_bad(data: dict[str, torch.Tensor], rank: int) -> dict[str, Any]:
    """Every call with bad input on one rank, on a group with a timeout (no hang on regression)."""
    group = dist.new_group([0, 1], timeout=timedelta(seconds=BAD_TIMEOUT_S))
    outcomes = {}
    with CollectiveCounter() as counter:
        for name, call in _one_rank_bad_calls(data, rank, group).items():
            try:
                outcome: Any = call().detach()
            except ValueError as error:
                outcome = str(error)
            outcomes[name] = (outcome, counter.take())
    return outcomes


def _worker(rank: int, world_size: int, data: dict[str, torch.Tensor], cases: list[dict[str, Any]]) -> dict:
    errors = _errors(data, rank)
    one_rank_bad = _one_rank_bad(data, rank)
    with CollectiveCounter() as counter:
        results = [_run_case(case, data, rank, counter) for case in cases]
    return {"errors": errors, "one_rank_bad": one_rank_bad, "results": results}


# --- the truth ---------------------------------------------------------------------------------


def truth(case: dict[str, Any], data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float64 loss and gradients of the full problem, on the inputs rounded to the case's dtype."""
    labels, kwargs = resolve(case["options"], data)
    hidden = data["hidden"].to(case["dtype"]).double().clone().requires_grad_()
    weight = data["weight"].to(case["dtype"]).double().clone().requires_grad_()
    if case["api"] == "linear":
        logits = hidden @ weight.T
    else:
        logits = (data["hidden"] @ data["weight"].T).to(case["dtype"]).double().clone().requires_grad_()
    logits.retain_grad()
    if kwargs.get("token_loss", "ce") == "ce":
        loss = naive_loss(logits, labels, reduction=case["reduction"], **kwargs)
        spec = causal_lm_loss(logits.detach(), labels, reduction=case["reduction"], **kwargs)
        torch.testing.assert_close(spec, loss, rtol=1e-12, atol=1e-12)  # the spec agrees with the truth here
    else:
        # DFT/focal: the spec in float64 on the full logits, differentiated by autograd
        # (tests/test_reference.py checks it against the papers' formulas written out).
        loss = causal_lm_loss(logits, labels, reduction=case["reduction"], **kwargs)
    if case["reduction"] == "none":
        (loss * data["upstream"]).sum().backward()
    else:
        loss.backward()
    return {"loss": loss.detach(), "hidden": hidden.grad, "weight": weight.grad, "logits": logits.grad}


def scored_rows(case: dict[str, Any], data: dict[str, torch.Tensor]) -> int:
    """Positions with a target and a non-zero weight: the rows the chunk loop visits."""
    labels, kwargs = resolve(case["options"], data)
    if case.get("static"):
        return labels.numel()
    ignore = kwargs.get("ignore_index", -100)
    weights = kwargs.get("token_weights", torch.ones(labels.shape, dtype=torch.float64))
    if kwargs.get("shift", True):
        labels, weights = labels[:, 1:], weights[:, 1:]
    return int(((labels != ignore) & (weights != 0)).sum())


def expected_calls(case: dict[str, Any], data: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    gather = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    n = scored_rows(case, data)
    layout = [gather] if case["layout"] == "gathered" else []
    if case["api"] == "logits":
        return layout + ([gather] if n else []), []
    # The default chunk holds every row of these tiny inputs, or 8 rows under a tiny budget.
    chunk = case["chunk"] or (8 if case.get("tiny_budget") else B * T)
    return layout + [gather] * math.ceil(n / chunk), ["all_reduce"] if n else []


# --- the tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The truth runs on tiny tensors: a second OpenMP thread on a busy 2-core machine
    only spins (cross_entropy went from 50 us to 70 ms per call)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def launched() -> tuple[dict, list[dict], list[dict]]:
    data, cases = make_data(), make_cases()
    return data, cases, run_gloo(_worker, 2, data, cases)


def _tolerance(case: dict[str, Any]) -> dict[str, float]:
    return {"rtol": 1e-10, "atol": 1e-12} if case["dtype"] == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}


@pytest.mark.distributed
def test_every_option_matches_the_one_process_truth(launched):
    data, cases, ranks = launched
    assert len(cases) > 80
    for i, case in enumerate(cases):
        if case["dtype"] == torch.bfloat16:
            continue  # see the next test
        expected = truth(case, data)
        got = [r["results"][i] for r in ranks]
        where = f"case {i}: {case}"
        for result in got:
            assert result["dtype"] == (torch.float64 if case["dtype"] == torch.float64 else torch.float32), where
            assert result["requires_grad"], where
            torch.testing.assert_close(result["loss"].double(), expected["loss"], **_tolerance(case), msg=where)
        if case["api"] == "linear":
            for result in got:  # the full hidden gradient on every rank: all-reduced inside
                torch.testing.assert_close(
                    result["hidden_grad"].double(), expected["hidden"], **_tolerance(case), msg=where
                )
            weight_grad = torch.cat([r["shard_grad"] for r in got]).double()
            torch.testing.assert_close(weight_grad, expected["weight"], **_tolerance(case), msg=where)
        else:
            logits_grad = torch.cat([r["shard_grad"] for r in got], dim=-1).double()
            torch.testing.assert_close(logits_grad, expected["logits"], **_tolerance(case), msg=where)


def naive_same_dtype(case: dict[str, Any], data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain path in the case's dtype: products in that dtype, then ``causal_lm_loss``."""
    labels, kwargs = resolve(case["options"], data)
    dtype = case["dtype"]
    hidden = data["hidden"].to(dtype).clone().requires_grad_()
    weight = data["weight"].to(dtype).clone().requires_grad_()
    if case["api"] == "linear":
        logits = hidden @ weight.T
    else:
        logits = (data["hidden"] @ data["weight"].T).to(dtype).clone().requires_grad_()
    logits.retain_grad()
    loss = causal_lm_loss(logits, labels, reduction=case["reduction"], **kwargs)
    if case["reduction"] == "none":
        (loss * data["upstream"].to(dtype)).sum().backward()
    else:
        loss.backward()
    return {"loss": loss.detach(), "hidden": hidden.grad, "weight": weight.grad, "logits": logits.grad}


@pytest.mark.distributed
def test_bfloat16_is_no_worse_than_the_naive_bfloat16_path(launched):
    """The tolerance rule: the error against the float64 truth stays within that of the plain
    same-dtype computation (bf16 products, float32 loss math), plus a small margin."""
    data, cases, ranks = launched
    low = [i for i, c in enumerate(cases) if c["dtype"] == torch.bfloat16]
    assert len(low) == 6
    for i in low:
        case, expected, naive = cases[i], truth(cases[i], data), naive_same_dtype(cases[i], data)
        got = [r["results"][i] for r in ranks]
        if case["api"] == "linear":
            pairs = [
                ("loss", got[0]["loss"]),
                ("hidden", got[0]["hidden_grad"]),
                ("hidden", got[1]["hidden_grad"]),
                ("weight", torch.cat([r["shard_grad"] for r in got])),
            ]
        else:
            pairs = [("loss", got[0]["loss"]), ("logits", torch.cat([r["shard_grad"] for r in got], dim=-1))]
        assert all(r["dtype"] == torch.float32 for r in got)  # float32 math, float32 loss
        for name, ours in pairs:
            ours_error = float((ours.double() - expected[name]).abs().max())
            naive_error = float((naive[name].double() - expected[name]).abs().max())
            scale = float(expected[name].abs().max())
            assert ours_error <= 2 * naive_error + 1e-3 * scale, (i, case, name, ours_error, naive_error)


@pytest.mark.distributed
def test_all_masked_batches_are_an_attached_zero_with_zero_gradients(launched):
    _, cases, ranks = launched
    masked = [i for i, c in enumerate(cases) if c["options"].get("labels") == "masked"]
    assert len(masked) == 12
    for i in masked:
        for rank in ranks:
            result = rank["results"][i]
            assert result["requires_grad"] and not result["loss"].isnan().any()
            assert float(result["loss"].abs().sum()) == 0.0
            assert float(result["shard_grad"].abs().sum()) == 0.0
            assert result["hidden_grad"] is None or float(result["hidden_grad"].abs().sum()) == 0.0


@pytest.mark.distributed
def test_a_rank_that_owns_no_target_still_gets_its_gradient(launched):
    data, cases, ranks = launched
    high = [i for i, c in enumerate(cases) if c["options"].get("labels") == "high"]
    assert high and int((data["labels/high"][data["labels/high"] >= 0] < SHARDS[1][0]).sum()) == 0
    for i in high:
        # Rank 0 holds none of the targets, yet its rows get the softmax part of the gradient.
        assert float(ranks[0]["results"][i]["shard_grad"].abs().sum()) > 0.0


@pytest.mark.distributed
def test_number_of_collectives_per_call(launched):
    data, cases, ranks = launched
    for i, case in enumerate(cases):
        forward, backward = expected_calls(case, data)
        for rank in ranks:
            assert rank["results"][i]["forward_calls"] == forward, (i, case)
            assert rank["results"][i]["backward_calls"] == backward, (i, case)
    # Every option, 4-token chunks, layout gathered: 10 positions - 2 ignored - 1 zero weight = 7 scored
    # rows, so 1 layout gather + 2 chunk gathers in forward and 1 all-reduce in backward.
    big = next(
        i
        for i, c in enumerate(cases)
        if c["options"] is ALL_ON and c["dtype"] == torch.float32 and c["api"] == "linear" and c["reduction"] == "mean"
    )
    assert len(ranks[0]["results"][big]["forward_calls"]) == 1 + math.ceil(scored_rows(cases[big], data) / CHUNK) == 3
    assert ranks[0]["results"][big]["backward_calls"] == ["all_reduce"]


@pytest.mark.distributed
def test_every_token_loss_is_covered(launched):
    """The DFT/focal cases of the first test: every form, every reduction, both entry points,
    each with smoothing, softcap and token weights somewhere, in float64 and float32."""
    _, cases, _ = launched
    seen = {(c["options"].get("token_loss"), c["reduction"], c["api"]) for c in cases}
    for form in ("dft", "focal", "focal_attached"):
        for reduction in ("mean", "sum", "none"):
            for api in ("linear", "logits"):
                assert (form, reduction, api) in seen
        mixed = [c["options"] for c in cases if c["options"].get("token_loss") == form]
        assert any("label_smoothing" in o and "token_weights" in o for o in mixed), form
    assert any(c["options"].get("token_loss") == "focal_attached" and c["dtype"] == torch.float32 for c in cases)


@pytest.mark.distributed
def test_the_token_loss_forms_are_told_apart_by_these_data(launched):
    """The data distinguish every form from plain CE well beyond the tolerance, so the
    comparison with the truth would catch an ignored ``token_loss``."""
    data, cases, ranks = launched
    plain = float(truth({"api": "logits", "reduction": "sum", "options": {}, "dtype": torch.float64}, data)["loss"])
    checked = set()
    for i, case in enumerate(cases):
        form = case["options"].get("token_loss")
        if case["options"] == {"token_loss": form} and case["reduction"] == "sum":
            assert abs(float(ranks[0]["results"][i]["loss"]) - plain) > 1e-3 * plain, (i, case)
            checked.add(form)
    assert checked == {"dft", "focal", "focal_attached"}


@pytest.mark.distributed
def test_bad_input_on_one_rank_raises_the_same_error_on_every_rank(launched):
    """The bad rank's flag travels in the call's first collective (the layout gather, or the
    first statistics gather when the layout is given): one collective, as for good input."""
    _, _, ranks = launched
    gather = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    for name, bad, detail, calls in ONE_RANK_BAD:
        for rank, result in enumerate(ranks):
            message, made = result["one_rank_bad"][name]
            assert isinstance(message, str), (name, rank, message)
            assert f"bad input on rank {bad} of the group" in message, (name, rank, message)
            assert "every rank of the group raises" in message, (name, rank, message)
            if rank == bad:
                assert detail in message, (name, message)
            else:
                assert "that rank's own error says what is wrong" in message, (name, message)
            assert made == [gather] * calls, (name, rank, made)


@pytest.mark.distributed
def test_bad_input_on_one_rank_corners(launched):
    data, _, ranks = launched
    good, bad = ranks[0]["one_rank_bad"], ranks[1]["one_rank_bad"]
    # No scored token, layout given: no collective anywhere; only the bad rank can know.
    assert float(good["masked/given"][0]) == 0.0 and good["masked/given"][1] == []
    assert "must have the same dtype" in bad["masked/given"][0] and bad["masked/given"][1] == []
    # Value checks off: gloo's CPU tensors can be read without a device sync, so both raise.
    assert "bad input on rank 1" in good["static/given"][0] and "must have the same dtype" in bad["static/given"][0]
    # The group is still in step: a good call afterwards gives the truth on both ranks.
    logits = data["hidden"] @ data["weight"].T
    expected = causal_lm_loss(logits, data["labels/default"], token_loss="focal_attached")
    for rank in ranks:
        torch.testing.assert_close(rank["one_rank_bad"]["good"][0], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.distributed
def test_bad_input_raises_on_every_rank(launched):
    _, _, ranks = launched
    for rank in ranks:
        label, gap, total, dtype, chunk, shard_classes, negative = rank["errors"]
        assert "labels[1, 2] = 23 is outside the vocabulary [0, 23)" in label
        assert "must tile [0, V) without gap or overlap: rank 1 starts at 10" in gap
        assert "vocab_size=24 but the shards of the group add up to 23" in total
        assert "must have the same dtype" in dtype and "bad input on ranks 0, 1" in dtype
        assert "chunk_size must be >= 1" in chunk
        assert "class_weights must have shape [V] = [23]" in shard_classes
        assert "class_weights must be finite and non-negative" in negative


def test_vocab_shard_bounds_tile_the_vocabulary():
    assert [vocab_shard_bounds(23, 2, r) for r in range(2)] == [(0, 12), (12, 23)]
    assert [vocab_shard_bounds(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [vocab_shard_bounds(2, 3, r) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        vocab_shard_bounds(10, 2, 2)


def test_without_torch_distributed_the_error_says_so():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"need torch\.distributed initialized"):
        vocab_parallel_linear_cross_entropy(
            torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long), group=None
        )


@pytest.mark.distributed
def test_the_class_weights_are_told_apart_by_these_data(launched):
    """Each class-weight case's truth differs from the same case without class weights
    (so the cases above can fail if a rank ignores them), and the zero-divisor mean is 0."""
    data, _, _ = launched
    for options in CLASS_WEIGHT_SETS:
        case = {"api": "logits", "reduction": "mean", "options": options, "dtype": torch.float64}
        plain = {**case, "options": {k: v for k, v in options.items() if k != "class_weights"}}
        with_classes, without = truth(case, data), truth(plain, data)
        assert not torch.allclose(with_classes["logits"], without["logits"]), options
        if options["class_weights"] == "zero_on_targets":
            assert float(with_classes["loss"]) == 0.0 and not bool(with_classes["logits"].any())
        else:
            assert not torch.allclose(with_classes["loss"], without["loss"]), options
