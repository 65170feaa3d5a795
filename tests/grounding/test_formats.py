"""lmloss.grounding.formats: reading and writing Qwen2-VL, Qwen2.5-VL JSON and bin-token box text.

Truths: text round trips against the boxes generated, hand-written malformed texts
with their offsets.
"""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmloss.grounding import (
    BoxFormatError,
    GroundedPhrase,
    format_boxes,
    format_grounding,
    parse_boxes,
    parse_grounding,
)

_SNIPPET = 80  # the length at which grounding quotes malformed text
QWEN_MARKERS = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"]


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


MALFORMED = [
    # (format, text, expected offset, quoted text (a prefix of the quote), problem words)
    ("qwen2-vl", "Look: <|box_start|>(1,2),(3,4)", 6, "<|box_start|>(1,2),(3,4)", "unclosed <|box_start|>"),
    (
        "qwen2-vl",
        "ab <|box_start|>(1,2),(3)<|box_end|>",
        3,
        "<|box_start|>(1,2),(3)<|box_end|>",
        "expected 4 coordinates",
    ),
    ("qwen2-vl", "<|box_start|>(1,2),(3,4),(5,6)<|box_end|>", 0, "<|box_start|>(1,2)", "found 6"),
    ("qwen2-vl", "x <|box_start|>(1,two),(3,4)<|box_end|>", 2, "<|box_start|>(1,two)", "non-numeric coordinate 'two'"),
    (
        "qwen2-vl",
        "<|box_start|>(1,2),(3,1001)<|box_end|>",
        0,
        "<|box_start|>(1,2),(3,1001)",
        "1001 is outside [0, 1000]",
    ),
    ("qwen2-vl", "<|box_start|>(-5,2),(3,4)<|box_end|>", 0, "<|box_start|>(-5,2)", "-5 is outside"),
    ("qwen2-vl", "ok <|box_start|>(50,2),(30,4)<|box_end|>", 3, "<|box_start|>(50,2),(30,4)", "x2 = 30 < x1 = 50"),
    ("qwen2-vl", "a<|box_start|>1,2,3,4<|box_end|>", 1, "<|box_start|>1,2,3,4", "expected the form (x1,y1),(x2,y2)"),
    (
        "qwen2-vl",
        "a<|object_ref_start|>cat<|box_start|>(1,2),(3,4)<|box_end|>",
        1,
        "<|object_ref_start|>cat",
        "unclosed <|object_ref_start|>",
    ),
    ("qwen2-vl", "stray <|box_end|>", 6, "<|box_end|>", "without a matching <|box_start|>"),
    ("qwen2.5-vl", 'A: [{"bbox_2d": [1, 2, 3], "label": "a"}]', 4, '{"bbox_2d": [1, 2, 3]', "expected 4 coordinates"),
    ("qwen2.5-vl", 'A: [{"bbox_2d": [1, "x", 3, 4]}]', 4, '{"bbox_2d": [1, "x"', "non-numeric coordinate 'x'"),
    ("qwen2.5-vl", 'A: {"bbox_2d": [9, 2, 3, 4]}', 3, '{"bbox_2d": [9, 2, 3, 4]}', "x2 = 3 < x1 = 9"),
    ("qwen2.5-vl", 'A: {"bbox_2d": [1, 2, 700, 4]}', 3, '{"bbox_2d": [1, 2, 700, 4]}', "700 is outside [0, 640]"),
    (
        "qwen2.5-vl",
        'A: [{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6',
        45,
        '{"bbox_2d": [5, 6',
        "invalid JSON",
    ),
    ("bins", "go <loc_1><loc_2><loc_3>", 3, "<loc_1><loc_2><loc_3>", "expected 4 bin tokens per box, found a run of 3"),
    ("bins", "<loc_1><loc_2><loc_x><loc_4>", 14, "<loc_x>", "non-numeric bin index 'x'"),
    ("bins", "<loc_1><loc_2><loc_3><loc_10>", 21, "<loc_10>", "bin index 10 is outside [0, 10)"),
    ("bins", "<loc_5><loc_2><loc_3><loc_4>", 0, "<loc_5><loc_2><loc_3><loc_4>", "x2 = 3 < x1 = 5"),
]


@pytest.mark.parametrize("fmt, text, offset, quote, problem", MALFORMED)
def test_malformed_box_text_is_rejected_with_its_text_and_offset(fmt, text, offset, quote, problem):
    options = {"num_bins": 10} if fmt == "bins" else {"image_size": (640, 480)} if fmt == "qwen2.5-vl" else {}
    with pytest.raises(BoxFormatError) as excinfo:
        parse_boxes(text, fmt, **options)
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
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


# ------------------------------------------------ hardening: time, depth, numbers, keys


def _best_of_3(parse, text: str) -> float:
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        parse(text)
        best = min(best, time.perf_counter() - start)
    return best


# (format, text of n "atoms", parse options, n for the 4x scaling check, n for the absolute
# bound). Each text made a parser quadratic (or recursive) before: a box that loops
# inside <|box_start|> (4,000 atoms took 0.32 s, 100,000 over 30 s), keys checked
# against every decoded value, brackets retried and re-decoded to the end of the text,
# and a lazy bin index rescanned from every "[".
LINEAR_CASES = {
    "qwen2-vl looping box": ("qwen2-vl", lambda n: "<|box_start|>" + "(1," * n + "<|box_end|>", {}, 2_500, 100_000),
    "qwen2-vl unclosed markers": ("qwen2-vl", lambda n: "<|box_start|>(1,2)" * n, {}, 2_500, 40_000),
    "qwen2.5-vl many objects": ("qwen2.5-vl", lambda n: '{"bbox_2d": [1, 2, 3, 4]} ' * (n // 6), {}, 6_000, 40_000),
    "qwen2.5-vl unclosed lists": ("qwen2.5-vl", lambda n: "[1, " * n, {}, 2_500, 40_000),
    "qwen2.5-vl brackets in strings": ("qwen2.5-vl", lambda n: '["[1, 2' * (n // 3), {}, 2_500, 40_000),
    "bins brackets": ("bins", lambda n: "[" * n, {"num_bins": 10, "pattern": "[{}]"}, 2_500, 100_000),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_parsers_are_linear_in_the_text(case):
    fmt, make, options, small, large = LINEAR_CASES[case]

    def parse(text: str) -> None:
        parse_grounding(text, fmt, errors="report", **options)

    # Complexity, not speed: 4x the text may take at most 10x the time (quadratic: 16x).
    # The 5 ms floor keeps timer noise on a tiny input from failing a linear parser.
    t_small = max(_best_of_3(parse, make(small)), 5e-3)
    t_4x = _best_of_3(parse, make(4 * small))
    assert t_4x < 10 * t_small, f"{case}: {t_small:.4f} s -> {t_4x:.4f} s for 4x the text"
    elapsed = _best_of_3(parse, make(large))
    assert elapsed < 2.0, f"{case}: {large} atoms took {elapsed:.2f} s"


def test_deeply_nested_json_is_reported_not_a_recursion_error():
    # Reproduction: 1,000+ levels raised RecursionError from json, even with errors="report".
    deep = "[" * 1000 + "]" * 1000
    parsed = parse_grounding(deep, "qwen2.5-vl", errors="report")
    assert parsed.boxes == [] and [i.offset for i in parsed.issues] == [0]
    assert "nested deeper than 100 levels" in parsed.issues[0].problem
    with pytest.raises(BoxFormatError) as excinfo:
        parse_boxes(deep, "qwen2.5-vl")
    assert excinfo.value.issue.offset == 0
    # A box deep inside: reported once (at the outermost bracket), never a traceback.
    text = "Answer: " + "[" * 5000 + '{"bbox_2d": [1, 2, 3, 4]}' + "]" * 5000
    parsed = parse_grounding(text, "qwen2.5-vl", errors="report")
    assert [i.offset for i in parsed.issues] == [8]
    # Just within the bound (100 containers: 98 lists, the object, its bbox list) it is
    # ordinary JSON.
    ok = "[" * 98 + '{"bbox_2d": [1, 2, 3, 4]}' + "]" * 98
    assert parse_boxes(ok, "qwen2.5-vl") == [(1.0, 2.0, 3.0, 4.0)]


HUGE = "1" * 4400  # beyond Python's 4,300-digit limit of int(str)
HUGE_NUMBERS = [
    ("qwen2-vl", f"x <|box_start|>({HUGE},2),(3,4)<|box_end|>", 2, {}),
    ("qwen2.5-vl", f'x {{"bbox_2d": [1, 2, {HUGE}, 4]}}', 2, {}),
    ("qwen2.5-vl", 'x {"bbox_2d": [1, 2, 1e999, 4]}', 2, {}),
    ("bins", f"x <loc_1><loc_2><loc_{HUGE}><loc_4>", 16, {"num_bins": 10}),
]


@pytest.mark.parametrize("fmt, text, offset, options", HUGE_NUMBERS)
def test_huge_numbers_are_box_format_errors_with_an_offset(fmt, text, offset, options):
    # Reproduction: 4,300+ digits raised int()'s bare ValueError, without offset,
    # even with errors="report".
    parsed = parse_grounding(text, fmt, errors="report", **options)
    assert parsed.boxes == [] and [i.offset for i in parsed.issues] == [offset]
    assert "finite" in parsed.issues[0].problem or "outside" in parsed.issues[0].problem
    with pytest.raises(BoxFormatError) as excinfo:
        parse_boxes(text, fmt, **options)
    assert excinfo.value.issue == parsed.issues[0]


@pytest.mark.parametrize(
    "text, key, again",
    [
        ('{"bbox_2d": [1, 2, 3, 4], "bbox_2d": [5, 6, 7, 8]}', "bbox_2d", 26),
        ('{"label": "cat", "bbox_2d": [1, 2, 3, 4], "label": "dog"}', "label", 42),
    ],
)
def test_a_key_written_twice_is_reported(text, key, again):
    # Reproduction: json keeps the last "bbox_2d", so the first box vanished silently.
    parsed = parse_grounding(text, "qwen2.5-vl", errors="report")
    assert parsed.boxes == [] and [i.offset for i in parsed.issues] == [0]
    assert f'"{key}" is written twice (again at character {again})' in parsed.issues[0].problem
    assert text[again:].startswith(f'"{key}"')
    with pytest.raises(BoxFormatError, match="written twice"):
        parse_boxes(text, "qwen2.5-vl")


NON_ASCII_DIGITS = [
    ("qwen2-vl", "<|box_start|>(\u0661\u0662,2),(30,40)<|box_end|>", 0, {}),  # Arabic-Indic 12
    ("qwen2-vl", "<|box_start|>(1,2),(3,\uff14)<|box_end|>", 0, {}),  # fullwidth 4
    ("qwen2.5-vl", '{"bbox_2d": [\u0661\u0662, 2, 30, 40]}', 0, {}),
    ("qwen2.5-vl", 'a [{"bbox_2d": [1, 2, 3, \uff14]}]', 2, {}),  # the outermost failed value
    ("bins", "<loc_1><loc_\u0662><loc_3><loc_4>", 7, {"num_bins": 10}),
]


@pytest.mark.parametrize("fmt, text, offset, options", NON_ASCII_DIGITS)
def test_non_ascii_digits_are_not_numbers(fmt, text, offset, options):
    # Reproduction: float() and str.isdecimal() read '١٢' as 12 and '１' as 1.
    parsed = parse_grounding(text, fmt, errors="report", **options)
    assert parsed.boxes == [] and [i.offset for i in parsed.issues] == [offset]
    assert "non-ASCII digit" in parsed.issues[0].problem
    with pytest.raises(BoxFormatError, match="non-ASCII digit"):
        parse_boxes(text, fmt, **options)
