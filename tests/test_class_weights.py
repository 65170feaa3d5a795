"""Issue 15, item 3: ``class_weights`` (``[V]``) is torch's ``weight`` of ``F.cross_entropy``.

The truth is PyTorch's own ``F.cross_entropy(weight=..., label_smoothing=..., reduction=...,
ignore_index=...)`` in float64 on the flattened, aligned logits, differentiated by
autograd; every CE entry point on one process (``causal_lm_loss``, ``linear_cross_entropy``
on the reference and chunked backends, the ``nn`` modules) is held to it over odd
shapes (T = 1, V not a power of two, all-ignored rows). Where torch's mean is 0/0 (NaN),
lmloss's documented choice (0, zero gradients) is tested instead. The vocab-parallel
functions are tested on two gloo ranks in tests/test_parallel.py, the interactions with
every other option by property in tests/test_loss_fuzz.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import lmloss
from lmloss import nn
from lmloss.accounting import count_targets

V, D = 13, 5
ENTRY_POINTS = ["causal_lm_loss", "reference", "chunked", "nn.CausalLMLoss", "nn.LinearCrossEntropyLoss"]


def _problem(shape: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, D, generator=g, dtype=torch.float64)
    weight = 2 * torch.randn(V, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = -100
    if len(shape) == 2 and shape[0] > 1:
        labels[1] = -100  # a row with no target at all
    classes = torch.rand(V, generator=g, dtype=torch.float64) * 3
    classes[int(labels.flatten()[labels.flatten() != -100][0]) if (labels != -100).any() else 0] = 0.0
    return {
        "hidden": hidden,
        "weight": weight,
        "labels": labels,
        "classes": classes,
        "upstream": torch.rand(shape, generator=g, dtype=torch.float64),
    }


def _loss(
    entry: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    classes: torch.Tensor,
    **options: object,
) -> torch.Tensor:
    """The entry point's loss of ``hidden @ weight.T`` (logits formed inside for the logits ones)."""
    if entry == "causal_lm_loss":
        return lmloss.causal_lm_loss(hidden @ weight.T, labels, class_weights=classes, **options)  # type: ignore[arg-type]  # mixed-type dict
    if entry in ("reference", "chunked"):
        return lmloss.linear_cross_entropy(
            hidden, weight, labels, class_weights=classes, backend=entry, chunk_size=2, **options
        )  # type: ignore[arg-type]  # mixed-type dict
    if entry == "nn.CausalLMLoss":
        return nn.CausalLMLoss(weight=classes, **options)(hidden @ weight.T, labels)  # type: ignore[arg-type]  # mixed-type dict
    return nn.LinearCrossEntropyLoss(class_weights=classes, chunk_size=2, **options)(  # type: ignore[arg-type]  # mixed-type dict
        hidden, weight, labels
    )


def _torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    classes: torch.Tensor,
    *,
    shift: bool,
    reduction: str,
    label_smoothing: float,
    ignore_index: int = -100,
) -> torch.Tensor:
    """torch's own cross_entropy on the aligned, flattened logits; ``none`` back in label alignment."""
    logits = hidden @ weight.T
    if shift:
        logits, targets = logits[..., :-1, :], labels[..., 1:]
    else:
        targets = labels
    out = F.cross_entropy(
        logits.reshape(-1, V),
        targets.reshape(-1),
        weight=classes,
        reduction=reduction,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
    )
    if reduction != "none":
        return out
    out = out.view(targets.shape)
    return F.pad(out, (1, 0)) if shift else out


def _grads(loss: torch.Tensor, inputs: tuple[torch.Tensor, ...], upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    total = (loss * upstream).sum() if loss.ndim else loss
    return torch.autograd.grad(total, inputs)


def _inputs(problem: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return problem["hidden"].clone().requires_grad_(), problem["weight"].clone().requires_grad_()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "shape, shift",
    [((3, 7), True), ((3, 7), False), ((1, 1), False), ((2, 1, 4), True)],
    ids=["shifted", "aligned", "T=1", "3-D"],
)
def test_every_entry_point_is_torch_cross_entropy_with_weight(entry, label_smoothing, reduction, shape, shift):
    problem = _problem(shape)
    if shape == (1, 1):
        problem["labels"][0, 0] = 4  # T = 1: its one target is scored
    labels, classes = problem["labels"], problem["classes"]
    options = dict(shift=shift, reduction=reduction, label_smoothing=label_smoothing)
    hidden, weight = _inputs(problem)
    got = _loss(entry, hidden, weight, labels, classes, **options)
    h, w = _inputs(problem)
    want = _torch(h, w, labels, classes, **options)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = problem["upstream"]
    for a, b in zip(_grads(got, (hidden, weight), upstream), _grads(want, (h, w), upstream)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_custom_ignore_index_is_torch_ignore_index(entry):
    problem = _problem((2, 6), seed=3)
    labels = problem["labels"].masked_fill(problem["labels"] == -100, 7)  # 7 is also a class id
    hidden, weight = _inputs(problem)
    got = _loss(entry, hidden, weight, labels, problem["classes"], ignore_index=7, label_smoothing=0.1)
    h, w = _inputs(problem)
    want = _torch(h, w, labels, problem["classes"], shift=True, reduction="mean", label_smoothing=0.1, ignore_index=7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_targets_that_all_weigh_zero_give_a_zero_mean_where_torch_gives_nan(entry, label_smoothing):
    """torch divides by the sum of the targets' weights, 0 here: NaN. lmloss: 0.0, finite,
    zero gradients (the all-masked rule); the sum is still torch's (the smoothing term)."""
    problem = _problem((2, 6), seed=1)
    labels = problem["labels"]
    classes = problem["classes"].clone()
    classes[labels[labels != -100]] = 0.0
    h, w = _inputs(problem)
    assert bool(_torch(h, w, labels, classes, shift=True, reduction="mean", label_smoothing=label_smoothing).isnan())
    hidden, weight = _inputs(problem)
    loss = _loss(entry, hidden, weight, labels, classes, label_smoothing=label_smoothing)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    assert all(not bool(g.any()) for g in _grads(loss, (hidden, weight), problem["upstream"]))
    total = _loss(entry, hidden, weight, labels, classes, label_smoothing=label_smoothing, reduction="sum")
    want = _torch(h, w, labels, classes, shift=True, reduction="sum", label_smoothing=label_smoothing)
    torch.testing.assert_close(total, want, rtol=1e-12, atol=1e-12)
    assert (float(total.detach()) > 0) == (label_smoothing > 0)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_all_masked_batch_is_an_attached_zero(entry, reduction):
    problem = _problem((2, 5), seed=2)
    labels = torch.full((2, 5), -100)
    hidden, weight = _inputs(problem)
    loss = _loss(
        entry, hidden, weight, labels, problem["classes"], label_smoothing=0.1, z_loss=0.1, reduction=reduction
    )
    assert not bool(loss.any()) and loss.requires_grad and bool(loss.isfinite().all())
    assert all(not bool(g.any()) for g in _grads(loss, (hidden, weight), problem["upstream"]))


# --- interactions: what torch has no counterpart for, held to identities ----------------------


def _both(entry: str, problem: dict[str, torch.Tensor], first: dict, second: dict) -> None:
    """The entry point's loss and gradients agree under two ways of asking for the same thing."""
    results = []
    for options in (first, second):
        hidden, weight = _inputs(problem)
        loss = _loss(entry, hidden, weight, problem["labels"], **options)
        results.append((loss, _grads(loss, (hidden, weight), problem["upstream"])))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("entry", ["causal_lm_loss", "chunked"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"z_loss": 0.05},
        {"normalize": "sequence"},
        {"token_loss": "dft"},
        {"token_loss": "focal_attached"},
        {"reduction": "none", "z_loss": 0.05, "token_loss": "focal"},
        {"num_items_in_batch": 4.0},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain",
)
def test_without_smoothing_class_weights_are_token_weights_of_the_targets(entry, options):
    """Without label smoothing torch's weight= weighs each target's loss by u[y] and counts
    u[y]: exactly token_weights=u[labels] (times any token weights given), z-loss, DFT/focal
    weights and sequence normalization included (lmloss weighs the z-loss by u[y])."""
    problem = _problem((3, 7), seed=4)
    labels, classes = problem["labels"], problem["classes"]
    tokens = torch.rand(labels.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    as_tokens = tokens * classes[labels.clamp(min=0)]
    _both(
        entry,
        problem,
        {"classes": classes, "token_weights": tokens, **options},
        {"classes": None, "token_weights": as_tokens, **options},
    )


@pytest.mark.parametrize("entry", ["causal_lm_loss", "chunked"])
@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_scaling_the_class_weights_leaves_the_mean_unchanged(entry, normalize):
    """As in torch (the mean divides by the sum of u[y]); z-loss and smoothing included."""
    problem = _problem((3, 7), seed=5)
    options = {"label_smoothing": 0.3, "z_loss": 0.05, "token_loss": "focal", "normalize": normalize}
    _both(entry, problem, {"classes": problem["classes"], **options}, {"classes": 7.5 * problem["classes"], **options})


@pytest.mark.parametrize("entry", ["causal_lm_loss", "chunked"])
def test_micro_batches_with_the_step_count_sum_to_the_big_batch(entry):
    """num_items_in_batch replaces the weighted count: with count_targets(class_weights=u)
    of the whole step, two micro-batches sum to torch's weighted mean of the big batch."""
    problem = _problem((4, 6), seed=6)
    labels, classes = problem["labels"], problem["classes"]
    count = classes[labels[:, 1:][labels[:, 1:] != -100]].sum()  # float64 (count_targets: float32)
    torch.testing.assert_close(count_targets(labels, class_weights=classes).double(), count, rtol=1e-6, atol=0.0)
    hidden, weight = _inputs(problem)
    total = sum(
        _loss(
            entry, hidden[i : i + 2], weight, labels[i : i + 2], classes, label_smoothing=0.1, num_items_in_batch=count
        )
        for i in (0, 2)
    )
    h, w = _inputs(problem)
    want = _torch(h, w, labels, classes, shift=True, reduction="mean", label_smoothing=0.1)
    torch.testing.assert_close(total, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(total, (hidden, weight), problem["upstream"]), _grads(want, (h, w), problem["upstream"])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_class_weights_get_no_gradient_and_low_precision_is_close_to_the_truth():
    problem = _problem((3, 7), seed=7)
    classes = problem["classes"].float().requires_grad_()
    hidden, weight = (t.float().requires_grad_() for t in (problem["hidden"], problem["weight"]))
    loss = lmloss.linear_cross_entropy(
        hidden, weight, problem["labels"], class_weights=classes, label_smoothing=0.1, backend="chunked"
    )
    loss.backward()
    assert classes.grad is None and loss.dtype == torch.float32
    h, w = _inputs(problem)
    want = _torch(h, w, problem["labels"], problem["classes"], shift=True, reduction="mean", label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


# --- errors -------------------------------------------------------------------------------------


def _calls() -> list[Callable[[torch.Tensor], object]]:
    problem = _problem((2, 4))
    h, w, labels = problem["hidden"], problem["weight"], problem["labels"]
    return [
        lambda u: lmloss.causal_lm_loss(h @ w.T, labels, class_weights=u),
        lambda u: lmloss.linear_cross_entropy(h, w, labels, class_weights=u, backend="chunked"),
        lambda u: lmloss.linear_cross_entropy(h, w, labels, class_weights=u, backend="reference"),
        lambda u: nn.CausalLMLoss(class_weights=u)(h @ w.T, labels),  # weight=: see the module test
        lambda u: nn.LinearCrossEntropyLoss(class_weights=u)(h, w, labels),
        lambda u: count_targets(labels, class_weights=u),
    ]


@pytest.mark.parametrize("call", range(6))
@pytest.mark.parametrize(
    "bad, words",
    [
        (torch.tensor([1.0] * (V - 1) + [-0.5], dtype=torch.float64), r"class_weights\[12\] = -0.5"),
        (torch.tensor([1.0] * 3 + [float("nan")] + [1.0] * (V - 4), dtype=torch.float64), r"class_weights\[3\] = nan"),
        (torch.tensor([float("inf")] + [1.0] * (V - 1), dtype=torch.float64), r"class_weights\[0\] = inf"),
        (torch.ones(1, V, dtype=torch.float64), r"class_weights must have shape \[V\]"),
        (torch.ones(V, dtype=torch.int64), "class_weights must be a floating-point tensor"),
    ],
    ids=["negative", "nan", "inf", "2-D", "integer"],
)
def test_bad_class_weights_raise_a_value_error_naming_them(call, bad, words):
    with pytest.raises(ValueError, match=words):
        _calls()[call](bad)


@pytest.mark.parametrize("call", range(5))  # count_targets does not know V
def test_class_weights_of_the_wrong_vocabulary_size_are_refused(call):
    with pytest.raises(ValueError, match=rf"class_weights must have shape \[V\] = \[{V}\] .*, got shape \({V + 1},\)"):
        _calls()[call](torch.ones(V + 1, dtype=torch.float64))


def test_the_module_holds_the_weights_as_torch_does():
    u = torch.rand(V, dtype=torch.float64)
    module = nn.CausalLMLoss(weight=u)
    assert module.class_weights is module.weight and "weight" in module.state_dict()
    assert module.to(torch.float32).weight.dtype == torch.float32  # a buffer: moves with the module
    assert "class_weights" in nn.LinearCrossEntropyLoss(class_weights=u).state_dict()
    with pytest.raises(ValueError, match="not both"):
        nn.CausalLMLoss(weight=u, class_weights=u)
    with pytest.raises(ValueError, match=r"weight must be finite and non-negative, got weight\[2\] = -1.0"):
        nn.CausalLMLoss(weight=torch.tensor([1.0, 0.0, -1.0]))
    module.class_weights = None
    assert module.weight is None


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_static_shapes_give_the_same_loss(backend, reduction):
    """Under lmloss.validation(False) every row is computed (unscored ones masked)."""
    problem = _problem((3, 7), seed=8)
    options = dict(label_smoothing=0.1, z_loss=0.01, reduction=reduction)
    results = []
    for checks in (True, False):
        hidden, weight = _inputs(problem)
        with lmloss.validation(checks):
            loss = _loss(backend, hidden, weight, problem["labels"], problem["classes"], **options)
        results.append((loss, _grads(loss, (hidden, weight), problem["upstream"])))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
