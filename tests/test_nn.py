"""lmloss.nn.CausalLMLoss: the module equals the function; legacy arguments map as in PyTorch."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from lmloss import causal_lm_loss
from lmloss.nn import CausalLMLoss


def test_module_equals_function_with_every_option():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 13, generator=g)
    labels = torch.randint(0, 13, (2, 6), generator=g)
    weights = torch.rand(2, 6, generator=g)
    options = dict(label_smoothing=0.1, z_loss=1e-3, softcap=10.0, normalize="sequence", reduction="sum")
    module = CausalLMLoss(**options)
    expected = causal_lm_loss(logits, labels, token_weights=weights, **options)
    torch.testing.assert_close(module(logits, labels, token_weights=weights), expected)
    torch.testing.assert_close(
        CausalLMLoss()(logits, labels, num_items_in_batch=40),
        causal_lm_loss(logits, labels, num_items_in_batch=40),
    )


@pytest.mark.parametrize("size_average, reduce", list(itertools.product([None, True, False], repeat=2)))
def test_legacy_arguments_map_like_pytorch(size_average, reduce):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce).reduction
    if size_average is None and reduce is None:
        assert CausalLMLoss().reduction == expected == "mean"
        return
    with pytest.warns(FutureWarning, match=f"use reduction='{expected}' instead"):
        module = CausalLMLoss(size_average=size_average, reduce=reduce, reduction="sum")
    assert module.reduction == expected


def test_legacy_reduction_is_what_the_module_computes():
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    with pytest.warns(FutureWarning):
        per_token = CausalLMLoss(reduce=False)(logits, labels)
    assert per_token.shape == labels.shape


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="reduction='avg'"):
        CausalLMLoss(reduction="avg")  # type: ignore[arg-type]  # a wrong type on purpose
    with pytest.raises(TypeError, match="size_average must be None or a bool"):
        CausalLMLoss(size_average=1)  # type: ignore[arg-type]  # a wrong type on purpose
    with pytest.raises(ValueError, match="label_smoothing"):
        CausalLMLoss(label_smoothing=-0.1)


def test_repr_lists_options():
    assert "z_loss=0.01" in repr(CausalLMLoss(z_loss=0.01))


def test_options_can_be_changed_after_construction():
    module = CausalLMLoss()
    module.reduction = "none"
    logits, labels = torch.randn(1, 3, 7), torch.randint(0, 7, (1, 3))
    assert module(logits, labels).shape == (1, 3)
    with pytest.raises(ValueError, match="reduction='avg'"):
        module.reduction = "avg"
    module.extra_state = 1  # other attributes are ordinary attributes
    assert module.extra_state == 1


def test_token_loss_options_in_both_modules():
    from lmloss import linear_cross_entropy
    from lmloss.nn import LinearCrossEntropyLoss

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 13, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 13, (2, 6), generator=g)
    # DFT by its formula on the materialized logits: CE times the detached target probability.
    z, y = logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(CausalLMLoss(token_loss="dft")(logits, labels), (ce * torch.exp(-ce)).mean())
    module = CausalLMLoss(token_loss="focal", focal_gamma=1.5, reduction="sum")
    torch.testing.assert_close(module(logits, labels), (ce * (1 - torch.exp(-ce)) ** 1.5).sum())
    assert "token_loss='focal'" in repr(module) and "focal_gamma=1.5" in repr(module)

    hidden, weight = torch.randn(2, 6, 4, generator=g), torch.randn(13, 4, generator=g)
    linear = LinearCrossEntropyLoss(token_loss="focal_attached", backend="chunked", chunk_size=3)
    torch.testing.assert_close(
        linear(hidden, weight, labels),
        linear_cross_entropy(hidden, weight, labels, token_loss="focal_attached", backend="reference"),
    )


def test_token_loss_options_are_checked_together():
    with pytest.raises(ValueError, match=r"focal_gamma=3\.0 is only used with"):
        CausalLMLoss(focal_gamma=3.0)
    with pytest.raises(ValueError, match="focal_gamma must be a finite number >= 0"):
        CausalLMLoss(token_loss="focal", focal_gamma=-1.0)
    module = CausalLMLoss(token_loss="focal", focal_gamma=3.0)
    with pytest.raises(ValueError, match="only used with"):
        module.token_loss = "ce"  # gamma would silently do nothing
    module.focal_gamma = None
    module.token_loss = "dft"
    assert module.options["token_loss"] == "dft"


def test_distillation_modules_equal_kl_div_written_out():
    """KL(teacher || student) x T^2 by F.kl_div on materialized logits, and the linear
    module equals the logits module."""
    import torch.nn.functional as F

    from lmloss.nn import DistillationLoss, LinearDistillationLoss

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 8, generator=g, dtype=torch.float64)
    th, tw = (
        torch.randn(2, 6, 5, generator=g, dtype=torch.float64),
        torch.randn(13, 5, generator=g, dtype=torch.float64),
    )
    labels = torch.randint(0, 13, (2, 6), generator=g)
    labels[0, :2] = -100
    s, t = h @ w.T, th @ tw.T
    tau = 2.0
    y = labels[:, 1:]
    keep = y != -100
    kl = F.kl_div(
        torch.log_softmax(s[:, :-1] / tau, -1),
        torch.log_softmax(t[:, :-1] / tau, -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    want = (kl * keep).sum() / keep.sum() * tau**2
    module = DistillationLoss(temperature=tau)
    torch.testing.assert_close(module(s, t, labels), want)
    linear = LinearDistillationLoss(temperature=tau, chunk_size=3)
    torch.testing.assert_close(linear(h, w, th, tw, labels), want)
    assert "temperature=2.0" in repr(module)
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(alpha=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        LinearDistillationLoss(chunk_size=0)
