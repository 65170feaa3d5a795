"""lmloss.grounding.geometry: IoU, GIoU, L1 of xyxy boxes.

Truths: hand-computed IoU/GIoU/L1 values (worked out in the comments),
torch.autograd.gradcheck in float64, float64 math for the float32/float16 results.
"""

from __future__ import annotations

import pytest
import torch
from _grounding_cases import t

from lmloss.grounding import (
    box_iou,
    giou,
    giou_loss,
    l1_box_loss,
)

# ------------------------------------------------------------------ geometry

# (pred, target, IoU, GIoU, L1), each worked out by hand.
GEOMETRY_CASES = {
    # Same 2x2 box: inter 4, union 4 -> IoU 1; enclosing = union -> GIoU 1; L1 0.
    "identical": ([0, 0, 2, 2], [0, 0, 2, 2], 1.0, 1.0, 0.0),
    # Unit squares 1 apart: inter 0, union 2, enclosing [0,0,3,1] area 3
    # -> GIoU = 0 - (3 - 2) / 3 = -1/3; L1 = |0-2| + 0 + |1-3| + 0 = 4.
    "disjoint": ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, -1 / 3, 4.0),
    # 2x2 inside 4x4: inter 4, union 16 -> 1/4; enclosing = the 4x4 -> GIoU 1/4; L1 = 4 * 1.
    "nested": ([1, 1, 3, 3], [0, 0, 4, 4], 0.25, 0.25, 4.0),
    # Sharing the edge x = 1: inter 0, union 2, enclosing [0,0,2,1] = 2 -> GIoU 0; L1 = 1 + 1.
    "touching": ([0, 0, 1, 1], [1, 0, 2, 1], 0.0, 0.0, 2.0),
    # Overlap [1,1,2,2]: inter 1, union 4 + 4 - 1 = 7, enclosing [0,0,3,3] = 9
    # -> GIoU = 1/7 - 2/9 = -5/63; L1 = 4 * 1.
    "partial": ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, -5 / 63, 4.0),
    # Two identical points: no area anywhere -> IoU 0 and GIoU 0 by convention (eps).
    "identical points": ([1, 1, 1, 1], [1, 1, 1, 1], 0.0, 0.0, 0.0),
    # A horizontal segment across a 2x2 box: inter 0 (no height), union 4,
    # enclosing the 2x2 -> GIoU 0; L1 = 0 + 1 + 0 + 1.
    "segment in box": ([0, 1, 2, 1], [0, 0, 2, 2], 0.0, 0.0, 2.0),
    # A point at (5,5) and the unit square: union 1, enclosing [0,0,5,5] = 25
    # -> GIoU = -(25 - 1)/25 = -0.96; L1 = 5 + 5 + 4 + 4.
    "far point": ([5, 5, 5, 5], [0, 0, 1, 1], 0.0, -0.96, 18.0),
    # Reversed corners count as empty: inter 0, union 4, enclosing [0,0,2,2] -> 0; L1 = 2*4.
    "reversed pred": ([2, 2, 0, 0], [0, 0, 2, 2], 0.0, 0.0, 8.0),
}


@pytest.mark.parametrize("case", list(GEOMETRY_CASES))
def test_iou_giou_l1_equal_hand_computed_values(case):
    pred, target, iou_value, giou_value, l1_value = GEOMETRY_CASES[case]
    p, q = t(pred), t(target)
    assert box_iou(p, q).item() == pytest.approx(iou_value, abs=1e-6)
    assert giou(p, q).item() == pytest.approx(giou_value, abs=1e-6)
    assert giou_loss(p, q).item() == pytest.approx(1 - giou_value, abs=1e-6)
    assert l1_box_loss(p, q).item() == pytest.approx(l1_value, abs=1e-12)
    # Symmetric (IoU and GIoU do not care which box is the prediction).
    assert giou(q, p).item() == pytest.approx(giou_value, abs=1e-6)


def test_geometry_is_elementwise_and_batched():
    cases = list(GEOMETRY_CASES.values())
    pred = t(*[c[0] for c in cases]).view(3, 3, 4)
    target = t(*[c[1] for c in cases]).view(3, 3, 4)
    expected = torch.tensor([c[3] for c in cases], dtype=torch.float64).view(3, 3)
    torch.testing.assert_close(giou(pred, target), expected, atol=1e-6, rtol=0)
    # One target broadcast against several predictions.
    out = box_iou(t([0, 0, 2, 2], [1, 1, 3, 3]), t([0, 0, 2, 2]))
    torch.testing.assert_close(out, torch.tensor([1.0, 1 / 7], dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_geometry_computes_in_float32(dtype):
    pred, target = t([0, 0, 2, 2]).to(dtype), t([1, 1, 3, 3]).to(dtype)
    for value in (box_iou(pred, target), giou(pred, target), l1_box_loss(pred, target), giou_loss(pred, target)):
        assert value.dtype == torch.float32
    assert giou(pred, target).item() == pytest.approx(-5 / 63, abs=1e-6)


def test_degenerate_boxes_have_finite_values_and_gradients():
    pred = t([1, 1, 1, 1], [0, 1, 2, 1], [5, 5, 5, 5], [2, 2, 0, 0], [0, 0, 0, 0]).requires_grad_()
    target = t([1, 1, 1, 1], [0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 0, 0]).requires_grad_()
    for fn in (box_iou, giou):
        value = fn(pred.float(), target.float())
        grads = torch.autograd.grad(value.sum(), (pred, target))
        assert torch.isfinite(value).all() and all(torch.isfinite(g).all() for g in grads)
    loss = giou_loss(pred, target) + l1_box_loss(pred, target)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and torch.isfinite(target.grad).all()
    # A segment inside a box is pulled to grow its height: d(GIoU)/d(y2) > 0.
    segment = t([0, 1, 2, 1]).requires_grad_()
    giou(segment, t([0, 0, 2, 2])).backward()
    assert segment.grad[0, 3] > 0 and segment.grad[0, 1] < 0


FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_finite_values_and_gradients_in_every_float_dtype(dtype):
    # Reproductions: float16 zero-width boxes had +-inf IoU gradients (1/eps = 1e7 in
    # float32, cast back beyond float16's 65504); coordinates of 1e30 gave NaN GIoU
    # (areas of 1e60 overflow float32: inf - inf).
    big = 6e4 if dtype == torch.float16 else 1e30  # near the top of the dtype's range
    pred = torch.tensor(
        [[0, 0, 0, 1], [0, 0, 0, 0], [2, 2, 1, 1], [0, 0, big, big], [big / 2, 0, big, big], [0, 0, 1, 1]],
        dtype=dtype,
    ).requires_grad_()
    target = torch.tensor(
        [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, big / 2, big], [0, 0, big / 2, big], [0, 0, big, big]],
        dtype=dtype,
    ).requires_grad_()
    terms = {
        "box_iou": lambda p, q: box_iou(p, q),
        "giou": lambda p, q: giou(p, q),
        "giou_loss": lambda p, q: giou_loss(p, q, reduction="none"),
        "l1_box_loss": lambda p, q: l1_box_loss(p, q, reduction="none"),
    }
    for name, fn in terms.items():
        value = fn(pred, target)
        assert torch.isfinite(value).all(), (name, value)
        for grad in torch.autograd.grad(value.sum(), (pred, target)):
            assert grad.dtype == dtype and torch.isfinite(grad).all(), (name, grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_giou_of_huge_coordinates_equals_the_float64_value(dtype):
    # Scale does not change IoU or GIoU: the float64 truth of the same boxes at 1e30
    # (areas 1e60 are finite in float64) is the hand value at unit scale.
    big = 1e30
    pred = torch.tensor([[0, 0, big, big], [big / 2, 0, big, big], [0, 0, big / 4, big / 4]], dtype=dtype)
    target = torch.tensor([[0, 0, big / 2, big], [0, 0, big / 2, big], [big / 2, big / 2, big, big]], dtype=dtype)
    # Halves: IoU 1/2 = GIoU. Touching halves: IoU 0, enclosing = union: GIoU 0.
    # Quarter square vs the far quarter: IoU 0, union 1/16 + 1/4, enclosing 1:
    # GIoU = -(1 - 5/16) = -11/16.
    expected = torch.tensor([0.5, 0.0, -11 / 16], dtype=torch.float64)
    torch.testing.assert_close(giou(pred, target).double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        box_iou(pred, target).double(), torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64), atol=1e-6, rtol=0
    )


def _general_position_boxes(n: int, seed: int) -> torch.Tensor:
    """Boxes with distinct, well-separated edges, so no min/max/clamp sits at a kink."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 2, generator=g, dtype=torch.float64)
    size = 0.3 + torch.rand(n, 2, generator=g, dtype=torch.float64)
    return torch.cat([low, low + size], dim=-1)


def test_gradcheck_iou_and_giou():
    pred = _general_position_boxes(6, 0).requires_grad_()
    target = _general_position_boxes(6, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: box_iou(a, b), (pred, target))
    assert torch.autograd.gradcheck(lambda a, b: giou(a, b), (pred, target))
    # Disjoint pairs too (GIoU's enclosing term is the only signal there).
    far = (target.detach() + 3.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: giou(a, b), (pred, far))


def test_reductions_and_num_boxes():
    pred = t([0, 0, 2, 2], [0, 0, 1, 1])
    target = t([1, 1, 3, 3], [2, 0, 3, 1])
    # Per box: L1 4 and 4; 1 - GIoU = 1 + 5/63 and 1 + 1/3.
    torch.testing.assert_close(l1_box_loss(pred, target, reduction="none"), t(4.0, 4.0).view(-1))
    assert l1_box_loss(pred, target, reduction="sum").item() == 8.0
    assert l1_box_loss(pred, target).item() == 4.0
    assert l1_box_loss(pred, target, num_boxes=8).item() == 1.0  # e.g. 8 boxes in the whole step
    expected = (1 + 5 / 63) + (1 + 1 / 3)
    assert giou_loss(pred, target, reduction="sum").item() == pytest.approx(expected, abs=1e-6)
    assert giou_loss(pred, target, num_boxes=torch.tensor(4)).item() == pytest.approx(expected / 4, abs=1e-6)


def test_no_box_gives_an_attached_zero():
    pred = torch.zeros(0, 4, requires_grad=True)
    for loss in (l1_box_loss(pred, torch.zeros(0, 4)), giou_loss(pred, torch.zeros(0, 4))):
        assert loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, pred)
        assert grad.shape == (0, 4)


def test_geometry_rejects_bad_input():
    with pytest.raises(ValueError, match=r"pred must have shape \[\.\.\., 4\]"):
        box_iou(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="broadcastable"):
        giou(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="floating-point"):
        giou(torch.zeros(4, dtype=torch.long), torch.zeros(4))
    with pytest.raises(ValueError, match="reduction='avg'"):
        l1_box_loss(torch.zeros(4), torch.zeros(4), reduction="avg")
    with pytest.raises(ValueError, match="num_boxes must be finite"):
        giou_loss(torch.zeros(1, 4), torch.zeros(1, 4), num_boxes=-1)
