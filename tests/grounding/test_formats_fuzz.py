"""lmloss.grounding.formats under fuzzing: round trips and arbitrary or mutated text.

Truths: the boxes and phrases the strategies generated (written with
format_grounding, read back inside random prose), and the documented error
contract: with errors="raise" a malformed text raises BoxFormatError and nothing
else; with errors="report" nothing is raised, and every issue quotes the text
found at its offset. Each test is bounded (max_examples, short texts).
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmloss.grounding import (
    BoxFormatError,
    GroundedPhrase,
    format_grounding,
    parse_grounding,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Prose that cannot write box text: no markers ("<", "|"), no JSON strings or fences
# ('"', "`"); brackets and digits are allowed (they must not be mistaken for boxes).
PROSE = st.text(alphabet="abc XYZ.,:;!?()[]{}-'\n0123456789", max_size=30)
PATTERNS = ["<loc_{}>", "<bin_{}>", "<loc{:04d}>"]


@st.composite
def boxes_within(draw, width: int, height: int, max_boxes: int = 4) -> list[tuple[float, ...]]:
    boxes = []
    for _ in range(draw(st.integers(1, max_boxes))):
        x1, x2 = sorted(draw(st.lists(st.integers(0, width), min_size=2, max_size=2)))
        y1, y2 = sorted(draw(st.lists(st.integers(0, height), min_size=2, max_size=2)))
        boxes.append((float(x1), float(y1), float(x2), float(y2)))
    return boxes


def _check_report(text: str, fmt: str, **options) -> None:
    """The contract: report never raises and quotes the text at each offset; raise raises only BoxFormatError."""
    parsed = parse_grounding(text, fmt, errors="report", **options)
    for box in parsed.boxes:  # what is kept is a valid box
        assert all(math.isfinite(v) and v >= 0 for v in box) and box[0] <= box[2] and box[1] <= box[3]
    for issue in parsed.issues:
        assert 0 <= issue.offset < max(len(text), 1)
        assert issue.text and text[issue.offset :].startswith(issue.text)
    try:
        boxes = parse_grounding(text, fmt, errors="raise", **options).boxes
    except BoxFormatError as error:
        assert parsed.issues and error.issue == parsed.issues[0]  # noqa: PT017 -- raising is one of two valid outcomes
    else:
        assert not parsed.issues and boxes == parsed.boxes


# ---------------------------------------------------------------- round trips


@FUZZ
@given(boxes_within(1000, 1000), st.data(), PROSE, PROSE)
def test_qwen2_vl_round_trip_inside_prose(boxes, data, before, after):
    phrase = st.one_of(st.none(), st.text(alphabet="abc XYZ-'(),0123456789", min_size=1, max_size=12))
    groups = [GroundedPhrase(data.draw(phrase), (box,)) for box in boxes]
    text = before + " " + format_grounding(groups, "qwen2-vl") + " " + after
    parsed = parse_grounding(text, "qwen2-vl")
    assert parsed.boxes == boxes and parsed.issues == ()
    assert [g.phrase for g in parsed.phrases if g.phrase is not None] == [g.phrase for g in groups if g.phrase]


@FUZZ
@given(st.integers(1, 5000), st.integers(1, 5000), st.data(), PROSE, PROSE)
def test_qwen25_vl_round_trip_inside_prose(width, height, data, before, after):
    boxes = data.draw(boxes_within(width, height))
    labels = [data.draw(st.one_of(st.none(), st.text(max_size=12))) for _ in boxes]  # any text: JSON escapes it
    groups = [GroundedPhrase(label, (box,)) for label, box in zip(labels, boxes)]
    text = before + "\n" + format_grounding(groups, "qwen2.5-vl", image_size=(width, height)) + "\n" + after
    parsed = parse_grounding(text, "qwen2.5-vl", image_size=(width, height))
    assert parsed.boxes == boxes and parsed.issues == ()
    assert [g.phrase for g in parsed.phrases] == labels


@FUZZ
@given(st.integers(1, 2000), st.sampled_from(PATTERNS), st.sampled_from(["xyxy", "yxyx"]), st.data(), PROSE, PROSE)
def test_bins_round_trip_inside_prose(num_bins, pattern, order, data, before, after):
    boxes = data.draw(boxes_within(num_bins - 1, num_bins - 1))
    groups = [GroundedPhrase(None, (box,)) for box in boxes]
    options = {"num_bins": num_bins, "pattern": pattern, "order": order}
    text = before + " " + format_grounding(groups, "bins", **options) + " " + after
    parsed = parse_grounding(text, "bins", **options)
    assert parsed.boxes == boxes and parsed.issues == ()


# --------------------------------------------------- arbitrary and mutated text

PIECES = {
    "qwen2-vl": [
        "<|box_start|>",
        "<|box_end|>",
        "<|object_ref_start|>",
        "<|object_ref_end|>",
        "(",
        ")",
        ",",
        " ",
        "1",
        "23",
        "999",
        "1001",
        "-",
        ".",
        "x",
        "\uff11",
        "\u0661",
        "1" * 30,
        "<|",
        "|>",
    ],
    "qwen2.5-vl": [
        "{",
        "}",
        "[",
        "]",
        '"bbox_2d"',
        '"label"',
        '"cat"',
        ":",
        ",",
        '"',
        "\\",
        " ",
        "\n",
        "1",
        "23",
        "-",
        ".",
        "e",
        "E",
        "+",
        "0",
        "true",
        "null",
        "NaN",
        "\uff11",
        "\u0661",
        "1" * 30,
        "```json",
        "```",
        "\\u005f",
        '"bbox\\u005f2d"',
    ],
    "bins": ["<loc_", ">", "<", "1", "23", "9", " ", "\n", "x", "\u0662", "1" * 30, "<loc_1>", "<loc_12>", "<loc_>"],
}
OPTIONS = {"qwen2-vl": {}, "qwen2.5-vl": {"image_size": (640, 480)}, "bins": {"num_bins": 16}}
VALID = {
    "qwen2-vl": "A <|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2),(30,40)<|box_end|> ok",
    "qwen2.5-vl": 'A ```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "cat"}, {"bbox_2d": [5, 6, 7, 8]}]\n```',
    "bins": "A <loc_1><loc_2><loc_3><loc_4> and <loc_5><loc_6><loc_7><loc_8>",
}


@pytest.mark.parametrize("fmt", list(PIECES))
@FUZZ
@given(data=st.data())
def test_text_built_from_format_pieces_never_breaks_the_contract(fmt, data):
    pieces = data.draw(st.lists(st.sampled_from(PIECES[fmt]), max_size=40))
    _check_report("".join(pieces), fmt, **OPTIONS[fmt])


@pytest.mark.parametrize("fmt", list(PIECES))
@FUZZ
@given(data=st.data())
def test_mutated_valid_text_never_breaks_the_contract(fmt, data):
    text = VALID[fmt]
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        end = data.draw(st.integers(at, min(len(text), at + 6)))
        insert = data.draw(st.one_of(st.sampled_from(PIECES[fmt]), st.text(max_size=3)))
        text = text[:at] + insert + text[end:]
    _check_report(text, fmt, **OPTIONS[fmt])


@pytest.mark.parametrize("fmt", list(PIECES))
@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=60))
def test_any_text_never_breaks_the_contract(fmt, text):
    _check_report(text, fmt, **OPTIONS[fmt])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 3000), st.sampled_from(["[", '{"a": ', '[{"bbox_2d": ']))
def test_any_json_depth_is_a_value_or_an_issue(depth, opener):
    closer = {"[": "]", '{"a": ': "}", '[{"bbox_2d": ': "}]"}[opener]
    text = opener * depth + '{"bbox_2d": [1, 2, 3, 4]}' + closer * depth
    _check_report(text, "qwen2.5-vl")
    parsed = parse_grounding(text, "qwen2.5-vl", errors="report")
    assert parsed.boxes == [(1.0, 2.0, 3.0, 4.0)] or parsed.issues
