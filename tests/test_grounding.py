"""lmloss.grounding: box text, box geometry, coordinate positions and box losses.

Truths used: hand-computed IoU/GIoU/L1 values (worked out in the comments),
hand-computed expectations of small distributions, torch.autograd.gradcheck in
float64, text round trips, a real tokenizer's character offsets (independent of the
token-id scan under test), and the box loss written out on fully materialized
float64 logits with plain Python loops.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmloss.grounding import (
    BoxFormatError,
    BoxTokenIds,
    GroundedPhrase,
    box_iou,
    box_loss,
    box_loss_from_logits,
    convert_boxes,
    expected_bin_coordinate,
    expected_boxes,
    expected_number,
    find_box_targets,
    format_boxes,
    format_grounding,
    giou,
    giou_loss,
    grounding_loss,
    l1_box_loss,
    parse_boxes,
    parse_grounding,
)
from lmloss.labels import encode_chat

from _tokenizers import build_chatml_tokenizer

_SNIPPET = 80  # the length at which grounding quotes malformed text
QWEN_MARKERS = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds wake-up latency (tens of ms per
    op on a busy 2-core machine, which made gradcheck take 20 s); restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


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


# ------------------------------------------------------- expected coordinates


def test_expected_bin_coordinate_equals_hand_computed_values():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    # Centres of 4 bins: 0.125, 0.375, 0.625, 0.875.
    # E = 0.0125 + 0.075 + 0.1875 + 0.35 = 0.625.
    assert expected_bin_coordinate(probs.log()).item() == pytest.approx(0.625, abs=1e-12)
    # T = 0.5 squares the probabilities: [.01, .04, .09, .16] / 0.30
    # E = (.00125 + .015 + .05625 + .14) / .3 = 0.2125 / 0.3.
    hot = expected_bin_coordinate(probs.log(), temperature=0.5)
    assert hot.item() == pytest.approx(0.2125 / 0.3, abs=1e-12)
    # Straight-through: the forward value is the argmax bin's centre, 0.875.
    assert expected_bin_coordinate(probs.log(), straight_through=True).item() == pytest.approx(0.875, abs=1e-12)


def test_expected_bin_coordinate_reads_only_the_bin_tokens_of_full_logits():
    bin_ids = [5, 2, 6, 0]  # bin k is token bin_ids[k]
    logits = torch.full((2, 7), 50.0, dtype=torch.float64)  # huge non-bin logits must not matter
    logits[0, bin_ids] = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).log()
    logits[1, bin_ids] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64).log()
    out = expected_bin_coordinate(logits, bin_ids)
    torch.testing.assert_close(out, torch.tensor([0.625, 0.125], dtype=torch.float64))
    assert expected_bin_coordinate(logits.to(torch.bfloat16), bin_ids).dtype == torch.float32


def test_straight_through_has_the_soft_gradient():
    z = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    (soft_grad,) = torch.autograd.grad(expected_bin_coordinate(z), z)
    (st_grad,) = torch.autograd.grad(expected_bin_coordinate(z, straight_through=True), z)
    torch.testing.assert_close(st_grad, soft_grad)
    assert soft_grad.abs().sum() > 0


def test_expected_number_equals_hand_computed_value():
    # "5?" digits: p1 = one-hot 5 -> 5; p2 = half 0, half 2 -> 1; p3 uniform -> 4.5.
    # Value = 5 * 100 + 1 * 10 + 4.5 = 514.5.
    probs = torch.zeros(3, 10, dtype=torch.float64)
    probs[0, 5] = 1.0
    probs[1, 0] = probs[1, 2] = 0.5
    probs[2] = 0.1
    logits = probs.clamp_min(1e-300).log()
    assert expected_number(logits).item() == pytest.approx(514.5, abs=1e-9)
    # Through full-vocabulary logits and the digit ids (digit d is token 20 + d).
    full = torch.zeros(3, 40, dtype=torch.float64)
    full[:, 20:30] = logits
    full[:, :20] = 30.0  # other tokens, large, ignored
    assert expected_number(full, list(range(20, 30))).item() == pytest.approx(514.5, abs=1e-9)


def test_gradcheck_expected_coordinates():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 12, dtype=torch.float64, generator=g, requires_grad=True)
    ids = [7, 1, 4, 9, 0]
    assert torch.autograd.gradcheck(lambda x: expected_bin_coordinate(x, ids, temperature=0.7), (z,))
    digits = torch.randn(3, 12, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: expected_number(x, list(range(1, 11))), (digits,))


def test_expected_coordinates_reject_bad_input():
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        expected_bin_coordinate(torch.zeros(2, 4), temperature=0.0)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 4\)"):
        expected_bin_coordinate(torch.zeros(2, 4), [1, 4])
    with pytest.raises(ValueError, match=r"\[\.\.\., L, 10\]"):
        expected_number(torch.zeros(3, 9))


# ---------------------------------------------------------------------- text

SAFE_PHRASE = st.text(alphabet="abcdefghij XYZ-'", min_size=1, max_size=12)


@st.composite
def grid_boxes(draw, upper_x: int = 1000, upper_y: int = 1000, min_size: int = 1):
    n = draw(st.integers(min_size, 4))
    boxes = []
    for _ in range(n):
        x1, x2 = sorted(draw(st.lists(st.integers(0, upper_x), min_size=2, max_size=2)))
        y1, y2 = sorted(draw(st.lists(st.integers(0, upper_y), min_size=2, max_size=2)))
        boxes.append((float(x1), float(y1), float(x2), float(y2)))
    return boxes


@settings(max_examples=40, deadline=None)
@given(grid_boxes(), st.data())
def test_qwen2_vl_round_trip(boxes, data):
    phrases = [data.draw(st.one_of(st.none(), SAFE_PHRASE)) for _ in boxes]
    text = format_boxes(boxes, "qwen2-vl", labels=phrases)
    assert parse_boxes(text, "qwen2-vl") == boxes
    labelled = [p for p in parse_grounding(text).phrases if p.phrase is not None]
    assert [p.phrase for p in labelled] == [p for p in phrases if p is not None]


@settings(max_examples=40, deadline=None)
@given(grid_boxes(upper_x=640, upper_y=480), st.data())
def test_qwen25_vl_round_trip(boxes, data):
    labels = [data.draw(st.text(max_size=10)) for _ in boxes]  # any text: JSON escapes it
    text = format_boxes(boxes, "qwen2.5-vl", labels=labels, image_size=(640, 480))
    parsed = parse_grounding("Here you go:\n" + text, "qwen2.5-vl", image_size=(640, 480))
    assert parsed.boxes == boxes
    assert [p.phrase for p in parsed.phrases] == labels


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 2000),
    st.sampled_from(["<loc_{}>", "<bin_{}>", "<loc{:04d}>"]),
    st.sampled_from(["xyxy", "yxyx"]),
    st.data(),
)
def test_bins_round_trip(num_bins, pattern, order, data):
    boxes = data.draw(grid_boxes(upper_x=num_bins - 1, upper_y=num_bins - 1))
    text = format_boxes(boxes, "bins", num_bins=num_bins, pattern=pattern, order=order)
    assert text.count(pattern.split("{")[0]) == 4 * len(boxes)
    assert parse_boxes(text, "bins", num_bins=num_bins, pattern=pattern, order=order) == boxes


def test_bins_writes_the_tokens_in_the_order_asked():
    box = [(1, 2, 3, 4)]
    assert format_boxes(box, "bins", num_bins=10) == "<loc_1><loc_2><loc_3><loc_4>"
    # PaliGemma: y before x, 4-digit indices.
    paligemma = format_boxes(box, "bins", num_bins=1024, pattern="<loc{:04d}>", order="yxyx")
    assert paligemma == "<loc0002><loc0001><loc0004><loc0003>"


def test_qwen2_vl_text_reads_back_identically_and_groups_boxes_by_phrase():
    text = (
        "<|object_ref_start|>the two dogs<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|>"
        "<|box_start|>(500,20),(990,1000)<|box_end|><|object_ref_start|>a cat<|object_ref_end|>"
        "<|box_start|>(0,0),(5,7)<|box_end|>"
    )
    parsed = parse_grounding(text)
    assert parsed.phrases == (
        GroundedPhrase("the two dogs", ((10, 20, 300, 400), (500, 20, 990, 1000)), 0),
        GroundedPhrase("a cat", ((0, 0, 5, 7),), text.index("<|object_ref_start|>a cat")),
    )
    assert format_grounding(parsed.phrases) == text
    # Prose between phrase and box ends the group: the box has no phrase.
    loose = "<|object_ref_start|>x<|object_ref_end|> is at <|box_start|>(1,2),(3,4)<|box_end|>"
    assert [(p.phrase, p.boxes) for p in parse_grounding(loose).phrases] == [("x", ()), (None, ((1, 2, 3, 4),))]


def test_qwen25_vl_reads_qwen_style_answers_and_skips_prose_brackets():
    text = (
        "I found [two] objects:\n```json\n[\n"
        '\t{"bbox_2d": [135, 114, 1016, 672], "label": "chair"},\n'
        '\t{"bbox_2d": [12, 40, 90, 88], "label": "cup"}\n]\n```\nAnd {"bbox_2d": [1, 2, 3, 4]} alone.'
    )
    parsed = parse_grounding(text, "qwen2.5-vl")
    assert [(p.phrase, p.boxes) for p in parsed.phrases] == [
        ("chair", ((135, 114, 1016, 672),)),
        ("cup", ((12, 40, 90, 88),)),
        (None, ((1, 2, 3, 4),)),
    ]
    assert parsed.phrases[0].offset == text.index('{"bbox_2d": [135')


def test_qwen25_vl_objects_are_in_key_order_with_their_own_offsets():
    # The car's "bbox_2d" comes after its nested wheel's: the wheel is first in the text,
    # and each phrase gets the offset of its own object's "{", not of the nearest "{".
    car = '{"parts": [{"bbox_2d": [1, 2, 3, 4], "label": "wheel"}], "bbox_2d": [0, 0, 50, 60], "label": "car"}'
    text = "A: " + car + ' and [{"bbox_2d": [7, 7, 8, 8], "label": "x"}]'
    parsed = parse_grounding(text, "qwen2.5-vl")
    assert parsed.phrases == (
        GroundedPhrase("wheel", ((1, 2, 3, 4),), text.index('{"bbox_2d": [1')),
        GroundedPhrase("car", ((0, 0, 50, 60),), text.index('{"parts"')),
        GroundedPhrase("x", ((7, 7, 8, 8),), text.index('{"bbox_2d": [7')),
    )
    # A problem in the parent is reported at the parent and quotes the parent; strings
    # holding braces, quotes and the key's name do not confuse the scan.
    bad = '{"parts": [{"label": "say \\"bbox_2d\\": {", "bbox_2d": [1, 2, 3, 4]}], "bbox_2d": [9, 0, 5, 60]}'
    report = parse_grounding("B: " + bad, "qwen2.5-vl", errors="report")
    assert [(p.phrase, p.offset) for p in report.phrases] == [('say "bbox_2d": {', 3 + bad.index('{"label"'))]
    assert [(i.offset, i.text) for i in report.issues] == [(3, bad[:_SNIPPET])]
    assert "x2 = 5 < x1 = 9" in report.issues[0].problem


def test_convert_boxes_between_grids():
    # 0-1000 grid -> pixels of a 640x480 image: x * 0.64, y * 0.48.
    assert convert_boxes([(250, 500, 1000, 1000)], src="grid", dst="pixels", image_size=(640, 480)) == [
        (160.0, 240.0, 640.0, 480.0)
    ]
    assert convert_boxes([(160, 240, 640, 480)], src="pixels", dst="normalized", image_size=(640, 480)) == [
        (0.25, 0.5, 1.0, 1.0)
    ]
    # normalized -> 10 bins: floor(x * 10), 1.0 clamps into the last bin; back: centres.
    assert convert_boxes([(0.0, 0.05, 0.55, 1.0)], src="normalized", dst="bins", num_bins=10) == [
        (0.0, 0.0, 5.0, 9.0)
    ]
    assert convert_boxes([(0, 0, 5, 9)], src="bins", dst="normalized", num_bins=10) == [(0.05, 0.05, 0.55, 0.95)]
    tensor = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    out = convert_boxes(tensor, src="normalized", dst="grid")
    assert isinstance(out, torch.Tensor) and out.shape == (1, 1, 4)
    torch.testing.assert_close(out, torch.tensor([[[100.0, 200.0, 300.0, 400.0]]]))
    with pytest.raises(ValueError, match=r"image_size=\(width, height\)"):
        convert_boxes([(0, 0, 1, 1)], src="pixels", dst="grid")


MALFORMED = [
    # (format, text, expected offset, quoted text (a prefix of the quote), problem words)
    ("qwen2-vl", "Look: <|box_start|>(1,2),(3,4)", 6, "<|box_start|>(1,2),(3,4)", "unclosed <|box_start|>"),
    ("qwen2-vl", "ab <|box_start|>(1,2),(3)<|box_end|>", 3, "<|box_start|>(1,2),(3)<|box_end|>",
     "expected 4 coordinates"),
    ("qwen2-vl", "<|box_start|>(1,2),(3,4),(5,6)<|box_end|>", 0, "<|box_start|>(1,2)", "found 6"),
    ("qwen2-vl", "x <|box_start|>(1,two),(3,4)<|box_end|>", 2, "<|box_start|>(1,two)",
     "non-numeric coordinate 'two'"),
    ("qwen2-vl", "<|box_start|>(1,2),(3,1001)<|box_end|>", 0, "<|box_start|>(1,2),(3,1001)", "1001 is outside [0, 1000]"),
    ("qwen2-vl", "<|box_start|>(-5,2),(3,4)<|box_end|>", 0, "<|box_start|>(-5,2)", "-5 is outside"),
    ("qwen2-vl", "ok <|box_start|>(50,2),(30,4)<|box_end|>", 3, "<|box_start|>(50,2),(30,4)", "x2 = 30 < x1 = 50"),
    ("qwen2-vl", "a<|box_start|>1,2,3,4<|box_end|>", 1, "<|box_start|>1,2,3,4", "expected the form (x1,y1),(x2,y2)"),
    ("qwen2-vl", "a<|object_ref_start|>cat<|box_start|>(1,2),(3,4)<|box_end|>", 1, "<|object_ref_start|>cat",
     "unclosed <|object_ref_start|>"),
    ("qwen2-vl", "stray <|box_end|>", 6, "<|box_end|>", "without a matching <|box_start|>"),
    ("qwen2.5-vl", 'A: [{"bbox_2d": [1, 2, 3], "label": "a"}]', 4, '{"bbox_2d": [1, 2, 3]', "expected 4 coordinates"),
    ("qwen2.5-vl", 'A: [{"bbox_2d": [1, "x", 3, 4]}]', 4, '{"bbox_2d": [1, "x"', "non-numeric coordinate 'x'"),
    ("qwen2.5-vl", 'A: {"bbox_2d": [9, 2, 3, 4]}', 3, '{"bbox_2d": [9, 2, 3, 4]}', "x2 = 3 < x1 = 9"),
    ("qwen2.5-vl", 'A: {"bbox_2d": [1, 2, 700, 4]}', 3, '{"bbox_2d": [1, 2, 700, 4]}', "700 is outside [0, 640]"),
    ("qwen2.5-vl", 'A: [{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6', 45, '{"bbox_2d": [5, 6',
     "invalid JSON"),
    ("bins", "go <loc_1><loc_2><loc_3>", 3, "<loc_1><loc_2><loc_3>", "expected 4 bin tokens per box, found a run of 3"),
    ("bins", "<loc_1><loc_2><loc_x><loc_4>", 14, "<loc_x>", "non-numeric bin index 'x'"),
    ("bins", "<loc_1><loc_2><loc_3><loc_10>", 21, "<loc_10>", "bin index 10 is outside [0, 10)"),
    ("bins", "<loc_5><loc_2><loc_3><loc_4>", 0, "<loc_5><loc_2><loc_3><loc_4>", "x2 = 3 < x1 = 5"),
]


@pytest.mark.parametrize(("fmt", "text", "offset", "quote", "problem"), MALFORMED)
def test_malformed_box_text_is_rejected_with_its_text_and_offset(fmt, text, offset, quote, problem):
    options = {"num_bins": 10} if fmt == "bins" else {"image_size": (640, 480)} if fmt == "qwen2.5-vl" else {}
    with pytest.raises(ValueError) as excinfo:
        parse_boxes(text, fmt, **options)
    message = str(excinfo.value)
    assert isinstance(excinfo.value, BoxFormatError)
    assert problem in message
    assert f"at character {offset}" in message
    assert repr(quote)[1:-1] in message  # the offending text is quoted
    # errors="report": no exception; the issue is listed, not dropped.
    parsed = parse_grounding(text, fmt, errors="report", **options)
    assert [issue.offset for issue in parsed.issues] == [offset]
    assert parsed.issues[0].text.startswith(quote) and problem in parsed.issues[0].problem


def test_report_keeps_the_good_boxes_and_lists_every_bad_one():
    text = (
        "<|box_start|>(1,2),(3,4)<|box_end|> then <|box_start|>(9,9),(1,1)<|box_end|>"
        " and <|box_start|>(5,6),(7,8)<|box_end|> <|box_start|>(0,0)"
    )
    parsed = parse_grounding(text, errors="report")
    assert parsed.boxes == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert [i.offset for i in parsed.issues] == [text.index("<|box_start|>(9"), text.index("<|box_start|>(0,0)")]
    with pytest.raises(BoxFormatError) as excinfo:
        parse_boxes(text)
    assert excinfo.value.issue == parsed.issues[0]  # raise mode reports the first one


def test_formatting_rejects_what_it_cannot_write():
    with pytest.raises(ValueError, match="1200 is outside"):
        format_boxes([(0, 0, 1200, 5)])
    with pytest.raises(ValueError, match="x2 = 1 < x1 = 5"):
        format_boxes([(5, 0, 1, 5)])
    with pytest.raises(ValueError, match="grounding marker"):
        format_boxes([(0, 0, 1, 1)], labels=["a<|box_end|>"])
    with pytest.raises(ValueError, match="no place for phrases"):
        format_boxes([(0, 0, 1, 1)], "bins", num_bins=4, labels=["cat"])
    with pytest.raises(ValueError, match="needs num_bins"):
        format_boxes([(0, 0, 1, 1)], "bins")
    with pytest.raises(ValueError, match="exactly one"):
        parse_boxes("", "bins", num_bins=4, pattern="<loc>")
    with pytest.raises(ValueError, match="fmt='kosmos'"):
        parse_boxes("", "kosmos")


# ----------------------------------------------------------------- positions


@pytest.fixture(scope="module")
def box_tokenizer():
    tokenizer = build_chatml_tokenizer()
    tokenizer.add_tokens(QWEN_MARKERS, special_tokens=True)
    return tokenizer


def _char_to_token(offsets: list[tuple[int, int]], char: int) -> int:
    hits = [i for i, (a, b) in enumerate(offsets) if a <= char < b]
    assert len(hits) == 1
    return hits[0]


def _digit_chars(text: str, answer_at: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """For each box in ``text`` after ``answer_at``: [(number, [(digit char, place)])] by regex."""
    boxes = []
    for box in re.finditer(r"<\|box_start\|>(.*?)<\|box_end\|>", text[answer_at:]):
        coords = []
        for number in re.finditer(r"\d+", box.group(1)):
            start = answer_at + box.start(1) + number.start()
            width = len(number.group())
            coords.append((int(number.group()), [(start + j, width - 1 - j) for j in range(width)]))
        boxes.append(coords)
    return boxes


def test_positions_in_a_real_tokenized_batch(box_tokenizer):
    tok = box_tokenizer
    answers = [
        "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(12,503),(600,1000)<|box_end|>",
        "Two: <|box_start|>(0,7),(45,99)<|box_end|> and <|box_start|>(100,200),(300,400)<|box_end|>.",
    ]
    prompt_box = "Is it at <|box_start|>(1,2),(3,4)<|box_end|>?"  # in the prompt: not a target
    chats = [[{"role": "user", "content": prompt_box}, {"role": "assistant", "content": a}] for a in answers]
    examples = [encode_chat(c, tok) for c in chats]
    width = max(len(e["input_ids"]) for e in examples)
    pad = tok.pad_token_id
    input_ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in examples])

    tokens = BoxTokenIds.from_tokenizer(tok)
    targets = find_box_targets(labels, tokens, input_ids=input_ids)

    # Hand-built expectation from the rendered text and the tokenizer's character offsets.
    expected_pos, expected_boxes, expected_place, expected_coord = [], [], [], []
    for b, (chat, example) in enumerate(zip(chats, examples)):
        text = tok.apply_chat_template(chat, tokenize=False)
        encoding = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        assert encoding["input_ids"] == example["input_ids"]
        answer_at = text.index(chat[1]["content"])
        for coords in _digit_chars(text, answer_at):
            expected_boxes.append([number / 1000 for number, _ in coords])
            for c, (_, digits) in enumerate(coords):
                for char, place in digits:
                    column = _char_to_token(encoding["offset_mapping"], char)
                    expected_pos.append(b * width + column - 1)  # shift: column - 1 predicts it
                    expected_place.append(place)
                    expected_coord.append(c)
    assert targets.positions.tolist() == expected_pos
    assert targets.place.tolist() == expected_place
    assert targets.coord_index.tolist() == expected_coord
    torch.testing.assert_close(targets.target_boxes, torch.tensor(expected_boxes))
    assert targets.row_index.tolist() == [0, 1, 1] and targets.box_index.tolist()[-1] == 2
    # The shift convention of causal_lm_loss: the target of position p is labels.flatten()[p + 1].
    digit_ids = torch.tensor(tokens.value_ids)
    assert labels.flatten()[targets.positions + 1].tolist() == digit_ids[targets.value_index].tolist()
    # Without input_ids the structure is read from the labels: same answer here.
    assert find_box_targets(labels, tokens).positions.tolist() == expected_pos


# Qwen2.5-VL answers: JSON boxes in pixels of each row's image (width, height).
QWEN25_ANSWERS = [
    format_boxes([(135, 7, 1016, 672), (12, 40, 90, 88)], "qwen2.5-vl", labels=["chair", "cup"]),
    '{"label": "dog", "bbox_2d": [0, 5, 63, 99]} is the only one.',
]
QWEN25_SIZES = [(1024, 768), (64, 100)]
QWEN25_PROMPT = 'Is it {"bbox_2d": [1, 2, 3, 4]}?'  # a box in the prompt: not a target
_QWEN25_LIST = re.compile(r'"bbox_2d"\s*:\s*\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]')


@pytest.fixture(scope="module")
def json_tokenizer():
    """lmloss's built-in byte-level BPE, trained on JSON answers, with digits split as Qwen2 does.

    The BPE learns merges such as '{"', 'bbox', ' "' and '],', so the "bbox_2d" key is
    tokenized differently in different contexts, as with Qwen's tokenizer.
    """
    from tokenizers import pre_tokenizers

    from lmloss.train.builtin import build_tokenizer

    tokenizer = build_tokenizer(QWEN25_ANSWERS * 10 + [QWEN25_PROMPT] * 5, vocab_size=320)
    # Qwen2's pre-tokenizer isolates every digit (\p{N}); the built-in one keeps numbers whole.
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return tokenizer


def _qwen25_batch(tok):
    chats = [[{"role": "user", "content": QWEN25_PROMPT}, {"role": "assistant", "content": a}] for a in QWEN25_ANSWERS]
    examples = [encode_chat(c, tok) for c in chats]
    width = max(len(e["input_ids"]) for e in examples)
    pad = tok.pad_token_id
    input_ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in examples])
    return chats, examples, input_ids, labels


def _qwen25_truth(tok, chats, examples):
    """Boxes found independently: regex on the rendered answer, the tokenizer's character offsets.

    Returns [(row, [[(column, place), ...] per coordinate], normalized target box)].
    """
    boxes = []
    for b, (chat, example) in enumerate(zip(chats, examples)):
        text = tok.apply_chat_template(chat, tokenize=False)
        encoding = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        assert encoding["input_ids"] == example["input_ids"]
        offsets = encoding["offset_mapping"]
        answer_at = text.index(chat[1]["content"])
        width, height = QWEN25_SIZES[b]
        for match in _QWEN25_LIST.finditer(text, answer_at):
            coords = []
            for k in range(1, 5):
                digits = []
                for char in range(match.start(k), match.end(k)):
                    column = _char_to_token(offsets, char)
                    assert offsets[column] == (char, char + 1)  # one digit per token
                    digits.append((column, match.end(k) - 1 - char))
                coords.append(digits)
            x1, y1, x2, y2 = (int(match.group(k)) for k in range(1, 5))
            boxes.append((b, coords, [x1 / width, y1 / height, x2 / width, y2 / height]))
    return boxes


def test_qwen25_vl_positions_in_a_real_tokenized_batch(json_tokenizer):
    tok = json_tokenizer
    chats, examples, input_ids, labels = _qwen25_batch(tok)
    width = labels.shape[1]
    tokens = BoxTokenIds.from_tokenizer(tok, "qwen2.5-vl")
    targets = find_box_targets(labels, tokens, input_ids=input_ids, image_size=QWEN25_SIZES)

    truth = _qwen25_truth(tok, chats, examples)
    assert [b for b, _, _ in truth] == [0, 0, 1]  # the prompt's box is not counted
    expected_pos = [b * width + column - 1 for b, coords, _ in truth for digits in coords for column, _ in digits]
    expected_place = [place for _, coords, _ in truth for digits in coords for _, place in digits]
    expected_coord = [c for _, coords, _ in truth for c, digits in enumerate(coords) for _ in digits]
    assert targets.positions.tolist() == expected_pos
    assert targets.place.tolist() == expected_place  # 1016 has 4 digits, 7 and 0 have one
    assert targets.coord_index.tolist() == expected_coord
    torch.testing.assert_close(targets.target_boxes, torch.tensor([box for _, _, box in truth]))
    assert targets.row_index.tolist() == [0, 0, 1]
    # Shifted like causal_lm_loss: position p predicts labels.flatten()[p + 1], a digit token.
    digit_ids = torch.tensor(tokens.value_ids)
    assert labels.flatten()[targets.positions + 1].tolist() == digit_ids[targets.value_index].tolist()
    # One (width, height) for every row gives the same positions (and its own normalization).
    same = find_box_targets(labels, tokens, image_size=(1024, 1024))
    assert same.positions.tolist() == expected_pos
    torch.testing.assert_close(same.target_boxes[2], torch.tensor([0, 5, 63, 99]) / 1024)
    assert targets.to("cpu").divisor.tolist() == targets.divisor.tolist()


def test_qwen25_vl_box_loss_equals_the_materialized_float64_computation(json_tokenizer):
    tok = json_tokenizer
    chats, examples, input_ids, labels = _qwen25_batch(tok)
    targets = find_box_targets(labels, BoxTokenIds.from_tokenizer(tok, "qwen2.5-vl"), image_size=QWEN25_SIZES)
    g = torch.Generator().manual_seed(5)
    vocab, dim = len(tok), 8
    hidden = torch.randn(*labels.shape, dim, dtype=torch.float64, generator=g)
    weight = torch.randn(vocab, dim, dtype=torch.float64, generator=g)
    terms = box_loss(hidden, weight, targets, l1_weight=2.0, giou_weight=0.5, eps=0.0)

    # Truth: full float64 logits, the expected digit at each column - 1, numbers / image size.
    logits = hidden @ weight.T
    digit_ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    preds, boxes = [], []
    for b, coords, box in _qwen25_truth(tok, chats, examples):
        sizes = QWEN25_SIZES[b] * 2
        pred = []
        for c, digits in enumerate(coords):
            value = 0.0
            for column, place in digits:
                probs = torch.softmax(logits[b, column - 1, digit_ids], -1).tolist()
                value += 10**place * sum(d * p for d, p in enumerate(probs))
            pred.append(value / sizes[c])
        preds.append(pred)
        boxes.append(box)
    l1 = sum(sum(abs(p - q) for p, q in zip(pr, bx)) for pr, bx in zip(preds, boxes)) / len(boxes)
    g_loss = sum(1 - _python_giou(pr, bx) for pr, bx in zip(preds, boxes)) / len(boxes)
    # rel 1e-7: the target boxes are stored in float32.
    assert terms["l1"].item() == pytest.approx(l1, rel=1e-7)
    assert terms["giou"].item() == pytest.approx(g_loss, rel=1e-7)
    assert terms["loss"].item() == pytest.approx(2.0 * l1 + 0.5 * g_loss, rel=1e-7)
    from_logits = box_loss_from_logits(logits, targets, l1_weight=2.0, giou_weight=0.5, eps=0.0)
    assert from_logits["loss"].item() == pytest.approx(terms["loss"].item(), rel=1e-12)
    out = grounding_loss(hidden, weight, labels, targets, l1_weight=2.0, giou_weight=0.5)
    assert out["l1"].item() == pytest.approx(l1, rel=1e-7)


def _char_row(text: str, merged: dict[int, str] | None = None) -> tuple[list[int], dict[int, str]]:
    """A character-level vocabulary (id = code point); ``merged`` ids stand for several characters."""
    texts = {i: chr(i) for i in range(128)} | (merged or {})
    return [ord(c) for c in text], texts


def test_qwen25_vl_malformed_token_boxes_raise_with_row_and_column_or_are_skipped():
    good = '{"bbox_2d": [1, 2, 3, 4]}'
    cases = {
        "not one digit token": ('{"bbox_2d": [', [1000], ", 3, 4, 5]}"),  # "12" as one token
        "expected 4 coordinates in \"bbox_2d\" [x1, y1, x2, y2], found 3": ('{"bbox_2d": [1, 2, 3]}', [], ""),
        "coordinate '1.5' is not a non-negative integer": ('{"bbox_2d": [1.5, 2, 3, 4]}', [], ""),
        "coordinate 700 is outside [0, 640] (a 640x480 image)": ('{"bbox_2d": [1, 2, 700, 4]}', [], ""),
        "x2 = 1 < x1 = 5": ('{"bbox_2d": [5, 2, 1, 4]}', [], ""),
        '"bbox_2d" is not followed by a list': ('{"bbox_2d": 7}', [], ""),
    }
    tokens = BoxTokenIds.json_digits([ord(str(d)) for d in range(10)], {1000: "12"} | {i: chr(i) for i in range(128)})
    for problem, (before, middle, after) in cases.items():
        row = [ord("A")] + [ord(c) for c in before] + middle + [ord(c) for c in after] + [ord(c) for c in good]
        labels = torch.tensor([row])
        with pytest.raises(ValueError, match=re.escape(problem)) as excinfo:
            find_box_targets(labels, tokens, image_size=(640, 480))
        assert "row 0, column 2" in str(excinfo.value)  # column of the key's opening quote
        skipped = find_box_targets(labels, tokens, image_size=(640, 480), on_error="skip")
        torch.testing.assert_close(skipped.target_boxes, torch.tensor([[1 / 640, 2 / 480, 3 / 640, 4 / 480]]))
    # Cut off by truncation: the list never closes.
    ids, texts = _char_row(good + ' {"bbox_2d": [5, 6')
    with pytest.raises(ValueError, match='unclosed "bbox_2d" list'):
        find_box_targets(torch.tensor([ids]), BoxTokenIds.json_digits([ord(str(d)) for d in range(10)], texts),
                         image_size=(640, 480))
    with pytest.raises(ValueError, match="token id 1000 is not in token_text"):
        find_box_targets(torch.tensor([[1000, ord("5")]]), BoxTokenIds.json_digits(range(48, 58), {53: "5"}),
                         image_size=(8, 8))
    # image_size: required for pixels, refused where it means nothing, one pair per row.
    with pytest.raises(ValueError, match="needs image_size"):
        find_box_targets(torch.tensor([ids]), tokens)
    with pytest.raises(ValueError, match="one such pair per row"):
        find_box_targets(torch.tensor([ids]), tokens, image_size=[(640, 480), (640, 480)])
    with pytest.raises(ValueError, match="not digits tokens"):
        find_box_targets(torch.tensor([[1]]), BoxTokenIds.digits(DIGITS, START, END), image_size=(640, 480))
    with pytest.raises(ValueError, match="json needs token_text"):
        BoxTokenIds("json", tuple(range(10)))


def test_qwen25_vl_numbers_merged_by_the_tokenizer_are_refused():
    """lmloss's built-in tokenizer as is (GPT-2 pre-tokenization) writes '135' as one token."""
    from lmloss.train.builtin import build_tokenizer

    tok = build_tokenizer(QWEN25_ANSWERS * 10, vocab_size=320)
    ids = tok.encode(QWEN25_ANSWERS[0])
    tokens = BoxTokenIds.from_tokenizer(tok, "qwen2.5-vl")  # the single digits exist
    with pytest.raises(ValueError, match="not one digit token"):
        find_box_targets(torch.tensor([ids]), tokens, image_size=(1024, 768))


def test_positions_of_bin_tokens_by_hand():
    # Vocabulary: 0..9 text, bins 10..17 (8 bins). Row 0: prompt [1 2], answer
    # [3, bins 2,5,6,7, 4]; row 1: shorter, padded, one box [1, 0, 7, 3].
    bins = list(range(10, 18))
    input_ids = torch.tensor([[1, 2, 3, 12, 15, 16, 17, 4], [1, 5, 11, 10, 17, 13, 4, 0]])
    labels = torch.tensor([[-100, -100, 3, 12, 15, 16, 17, 4], [-100, 5, 11, 10, 17, 13, 4, -100]])
    targets = find_box_targets(labels, BoxTokenIds.bins(bins), input_ids=input_ids)
    # Row 0 bins at columns 3..6 -> positions 2..5; row 1 at columns 2..5 -> 8 + 1..4.
    assert targets.positions.tolist() == [2, 3, 4, 5, 9, 10, 11, 12]
    assert targets.coord_index.tolist() == [0, 1, 2, 3] * 2
    assert targets.value_index.tolist() == [2, 5, 6, 7, 1, 0, 7, 3]
    # Centres (k + 0.5) / 8.
    expected = torch.tensor([[2.5, 5.5, 6.5, 7.5], [1.5, 0.5, 7.5, 3.5]]) / 8
    torch.testing.assert_close(targets.target_boxes, expected)
    # shift=False: the position is the column itself.
    unshifted = find_box_targets(labels, BoxTokenIds.bins(bins), shift=False)
    assert unshifted.positions.tolist() == [3, 4, 5, 6, 10, 11, 12, 13]
    # yxyx order (PaliGemma): the first token is y1.
    yx = find_box_targets(labels, BoxTokenIds.bins(bins, order="yxyx"))
    assert yx.coord_index.tolist()[:4] == [1, 0, 3, 2]
    torch.testing.assert_close(yx.target_boxes[0], torch.tensor([5.5, 2.5, 7.5, 6.5]) / 8)


DIGITS = list(range(20, 30))  # digit d is token 20 + d
START, END, COMMA = 40, 41, 42


def _digit_row(*numbers: int) -> list[int]:
    row = [START]
    for n in numbers:
        row += [20 + int(d) for d in str(n)] + [COMMA]
    return row[:-1] + [END]


def test_malformed_token_boxes_raise_with_row_and_column_or_are_skipped():
    tokens = BoxTokenIds.digits(DIGITS, START, END, merged_digit_ids=[33])
    good = _digit_row(1, 2, 3, 4)
    cases = {
        "unclosed box": [1] + good[:-1],  # truncated before <|box_end|>
        "expected 4 numbers in the box, found 3": [1] + _digit_row(1, 2, 3),
        "holds several characters with a digit": [1] + good[:3] + [33] + good[3:],
        "x2 = 1 < x1 = 5": [1] + _digit_row(5, 2, 1, 4),
        "coordinate 1001 is outside [0, 1000] (the 0-1000 grid)": [1] + _digit_row(1, 2, 1001, 4),
    }
    for problem, row in cases.items():
        labels = torch.tensor([row + good])
        with pytest.raises(ValueError, match=re.escape(problem)) as excinfo:
            find_box_targets(labels, tokens)
        assert "row 0, column 1" in str(excinfo.value)
        skipped = find_box_targets(labels, tokens, on_error="skip")
        assert skipped.num_boxes == 1  # only the good box remains
        torch.testing.assert_close(skipped.target_boxes, torch.tensor([[0.001, 0.002, 0.003, 0.004]]))
    # Partly masked box: some digits trained, some not.
    labels = torch.tensor([[1] + good])
    labels[0, 2] = -100  # the digit of x1
    with pytest.raises(ValueError, match="only some of its coordinate tokens"):
        find_box_targets(labels, tokens, input_ids=torch.tensor([[1] + good]))
    # Fully masked box (the prompt): silently not a target, even if malformed.
    ids = torch.tensor([[1] + _digit_row(1, 2, 3) + good])
    labels = ids.clone()
    labels[0, : len(_digit_row(1, 2, 3)) + 1] = -100
    assert find_box_targets(labels, tokens, input_ids=ids).num_boxes == 1


def test_merged_digit_tokens_are_refused_by_from_tokenizer():
    class GPT2Like:  # encodes "7" fine but its vocabulary is irrelevant; "5" merges
        def encode(self, text, add_special_tokens=False):
            return [1, 2] if text == "5" else [ord(text[0])]

        def get_vocab(self):
            return {}

    with pytest.raises(ValueError, match="'5' encodes to 2 tokens"):
        BoxTokenIds.from_tokenizer(GPT2Like())


# ---------------------------------------------------------------- box loss


def _python_giou(p: list[float], q: list[float]) -> float:
    """GIoU in plain Python for valid boxes (the formula of Rezatofighi et al.)."""
    area = lambda b: max(b[2] - b[0], 0) * max(b[3] - b[1], 0)  # noqa: E731
    iw = max(min(p[2], q[2]) - max(p[0], q[0]), 0)
    ih = max(min(p[3], q[3]) - max(p[1], q[1]), 0)
    inter = iw * ih
    union = area(p) + area(q) - inter
    enclosing = (max(p[2], q[2]) - min(p[0], q[0])) * (max(p[3], q[3]) - min(p[1], q[1]))
    return inter / union - (enclosing - union) / enclosing


def _materialized_box_loss(logits: torch.Tensor, labels: torch.Tensor, tokens: BoxTokenIds) -> dict[str, float]:
    """The box terms from full float64 logits, written out with loops over the labels."""
    b_size, width, _ = logits.shape
    preds, targets = [], []
    for b in range(b_size):
        row = labels[b].tolist()
        col = 0
        while col < width:
            if tokens.kind == "bins" and row[col] in tokens.value_ids:
                ids = torch.tensor(tokens.value_ids)
                n = len(ids)
                centres = [(k + 0.5) / n for k in range(n)]
                p, q = [], []
                for j in range(4):  # position col + j - 1 predicts the token at col + j
                    probs = torch.softmax(logits[b, col + j - 1, ids].double(), -1)
                    p.append(sum(float(probs[k]) * centres[k] for k in range(n)))
                    q.append(centres[tokens.value_ids.index(row[col + j])])
                preds.append(p)
                targets.append(q)
                col += 4
                continue
            if tokens.kind == "digits" and row[col] == tokens.box_start_id:
                end = row.index(tokens.box_end_id, col)
                p, q, number = [], [], []
                for c in range(col + 1, end + 1):
                    if c < end and row[c] in tokens.value_ids:
                        number.append(c)
                    elif number:
                        ids = torch.tensor(tokens.value_ids)
                        value, truth = 0.0, 0
                        for j, c2 in enumerate(number):
                            probs = torch.softmax(logits[b, c2 - 1, ids].double(), -1)
                            mean_digit = sum(float(probs[d]) * d for d in range(10))
                            value += 10 ** (len(number) - 1 - j) * mean_digit
                            truth = truth * 10 + tokens.value_ids.index(row[c2])
                        p.append(value / 1000)
                        q.append(truth / 1000)
                        number = []
                preds.append(p)
                targets.append(q)
                col = end + 1
                continue
            col += 1
    m = len(preds)
    l1 = sum(sum(abs(a - c) for a, c in zip(p, q)) for p, q in zip(preds, targets)) / m
    g = sum(1 - _python_giou(p, q) for p, q in zip(preds, targets)) / m
    return {"l1": l1, "giou": g}


def _digit_batch() -> tuple[torch.Tensor, BoxTokenIds]:
    row0 = [1, 2] + _digit_row(12, 503, 600, 1000) + [3]
    row1 = [4] + _digit_row(7, 0, 45, 99) + _digit_row(100, 200, 300, 400) + [5]
    width = max(len(row0), len(row1))
    labels = torch.tensor([row0 + [-100] * (width - len(row0)), row1 + [-100] * (width - len(row1))])
    labels[0, :2] = -100  # prompt
    return labels, BoxTokenIds.digits(DIGITS, START, END)


def _bin_batch() -> tuple[torch.Tensor, BoxTokenIds]:
    bins = [30 + k for k in range(12)]
    labels = torch.tensor([[-100, 1, 33, 35, 38, 40, 2, 31, 30, 41, 39, 3], [-100, 4, 32, 36, 34, 37, 5, -100, -100,
                                                                               -100, -100, -100]])
    return labels, BoxTokenIds.bins(bins)


@pytest.mark.parametrize("batch", [_digit_batch, _bin_batch])
def test_box_loss_from_hidden_equals_the_materialized_computation(batch):
    labels, tokens = batch()
    g = torch.Generator().manual_seed(3)
    vocab, dim = 48, 6
    hidden = torch.randn(*labels.shape, dim, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(vocab, dim, dtype=torch.float64, generator=g, requires_grad=True)
    targets = find_box_targets(labels, tokens)
    assert targets.num_boxes == 3
    # eps=0: the plain formula (these boxes are far from degenerate).
    terms = box_loss(hidden, weight, targets, l1_weight=2.0, giou_weight=0.5, eps=0.0)
    logits = hidden @ weight.T
    truth = _materialized_box_loss(logits.detach(), labels, tokens)
    # rel 1e-7: BoxTargets stores the target boxes in float32 (503/1000 is not exact).
    assert terms["l1"].item() == pytest.approx(truth["l1"], rel=1e-7)
    assert terms["giou"].item() == pytest.approx(truth["giou"], rel=1e-7)
    assert terms["loss"].item() == pytest.approx(2.0 * truth["l1"] + 0.5 * truth["giou"], rel=1e-7)
    # The logits form agrees, value and gradient.
    from_logits = box_loss_from_logits(logits, targets, l1_weight=2.0, giou_weight=0.5, eps=0.0)
    grads = torch.autograd.grad(terms["loss"], (hidden, weight))
    ref_grads = torch.autograd.grad(from_logits["loss"], (hidden, weight))
    assert from_logits["loss"].item() == pytest.approx(terms["loss"].item(), rel=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_box_loss_touches_only_the_coordinate_rows_and_value_tokens():
    labels, tokens = _digit_batch()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(*labels.shape, 4, generator=g)
    weight = torch.randn(48, 4, generator=g)
    targets = find_box_targets(labels, tokens)
    # NaN everywhere the loss must not read: other vocabulary rows, other positions.
    poisoned_w = torch.full_like(weight, float("nan"))
    poisoned_w[list(tokens.value_ids)] = weight[list(tokens.value_ids)]
    poisoned_h = torch.full_like(hidden, float("nan")).view(-1, 4)
    poisoned_h[targets.positions] = hidden.view(-1, 4)[targets.positions]
    poisoned_h = poisoned_h.view_as(hidden).requires_grad_()
    poisoned_w.requires_grad_()
    terms = box_loss(poisoned_h, poisoned_w, targets)
    clean = box_loss(hidden, weight, targets)
    assert terms["loss"].item() == pytest.approx(clean["loss"].item(), rel=1e-6)
    terms["loss"].backward()
    assert torch.isfinite(poisoned_w.grad).all() and torch.isfinite(poisoned_h.grad).all()
    others = torch.ones(48, dtype=torch.bool)
    others[list(tokens.value_ids)] = False
    assert (poisoned_w.grad[others] == 0).all()


def test_gradcheck_box_loss():
    labels, tokens = _bin_batch()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(*labels.shape, 3, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(48, 3, dtype=torch.float64, generator=g, requires_grad=True)
    targets = find_box_targets(labels, tokens)
    assert torch.autograd.gradcheck(lambda h, w: box_loss(h, w, targets, temperature=0.8)["loss"], (hidden, weight))
    digit_labels, digit_tokens = _digit_batch()
    digit_targets = find_box_targets(digit_labels, digit_tokens)
    hidden = torch.randn(*digit_labels.shape, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w: box_loss(h, w, digit_targets)["loss"], (hidden, weight))


def test_box_loss_is_float32_and_an_attached_zero_without_boxes():
    labels, tokens = _bin_batch()
    hidden = torch.randn(*labels.shape, 4, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(48, 4, dtype=torch.bfloat16, requires_grad=True)
    targets = find_box_targets(labels, tokens)
    assert all(v.dtype == torch.float32 for v in box_loss(hidden, weight, targets).values())
    assert expected_boxes(hidden, weight, targets).shape == (3, 4)
    empty = find_box_targets(torch.full_like(labels, -100), tokens)
    terms = box_loss(hidden, weight, empty)
    assert terms["loss"].item() == 0.0 and terms["loss"].requires_grad
    terms["loss"].backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_grounding_loss_adds_the_terms_to_the_token_cross_entropy():
    labels, tokens = _digit_batch()
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(*labels.shape, 8, generator=g)
    weight = torch.randn(48, 8, generator=g)
    targets = find_box_targets(labels, tokens)
    out = grounding_loss(hidden, weight, labels, targets, l1_weight=2.0, giou_weight=0.2)
    ce = torch.nn.functional.cross_entropy(  # PyTorch's own CE on the shifted targets
        (hidden[:, :-1] @ weight.T).reshape(-1, 48), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert out["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    box = box_loss(hidden, weight, targets)
    assert out["l1"].item() == pytest.approx(box["l1"].item()) and out["giou"].item() == pytest.approx(
        box["giou"].item()
    )
    assert out["loss"].item() == pytest.approx(ce.item() + 2.0 * box["l1"].item() + 0.2 * box["giou"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="shift=False but the box targets were found with shift=True"):
        grounding_loss(hidden, weight, labels, targets, shift=False)
    with pytest.raises(ValueError, match="positions"):
        box_loss(hidden[:1], weight, targets)


# ---------------------------------------------------------------------- demo


def test_grounding_demo_smoke(tmp_path, monkeypatch):
    path = Path(__file__).resolve().parents[1] / "examples" / "grounding_demo.py"
    spec = importlib.util.spec_from_file_location("grounding_demo", path)
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "grounding_demo", demo)  # dataclasses look their module up
    spec.loader.exec_module(demo)
    out = tmp_path / "results.json"
    demo.main(["--steps", "3", "--seeds", "1", "--eval-images", "8", "--out", str(out)])
    results = json.loads(out.read_text())
    for variant in ("ce", "ce+box"):
        runs = results["variants"][variant]["runs"]
        assert len(runs) == 1 and 0.0 <= runs[0]["mean_iou"] <= 1.0
        assert math.isfinite(runs[0]["final_loss"])
