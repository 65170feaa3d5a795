"""Box text: read and write the grounding conventions of vision-language models.

"qwen2-vl" (``<|object_ref_start|>phrase<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``
on a 0-1000 grid), "qwen2.5-vl" (JSON ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}``
in pixels) and "bins" (location tokens such as ``<loc_12>``, 4 per box).

Every parser runs in time linear in the text (a model output that loops inside a
box must not stall training), and malformed box text is never dropped silently: it
raises :class:`BoxFormatError` quoting it with its character offset, or is listed
in ``GroundingParse.issues``. Only ASCII digits write numbers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any, Literal, cast

from lmloss._validation import check_choice
from lmloss.grounding._common import (
    BOX_END,
    BOX_START,
    DEFAULT_BIN_PATTERN,
    FORMATS,
    QWEN2_VL_GRID,
    REF_END,
    REF_START,
    Box,
    BoxFormatError,
    Format,
    GroundedPhrase,
    GroundingParse,
    IssueList,
    bin_affixes,
    box_problem,
    check_image_size,
    check_num_bins,
    check_order,
    digits_problem,
)
from lmloss.grounding._json import parse_qwen25_vl

__all__ = ["format_boxes", "format_grounding", "parse_boxes", "parse_grounding"]


def parse_grounding(
    text: str,
    fmt: Format = "qwen2-vl",
    *,
    errors: Literal["raise", "report"] = "raise",
    image_size: tuple[int, int] | None = None,
    num_bins: int | None = None,
    pattern: str = DEFAULT_BIN_PATTERN,
    order: Literal["xyxy", "yxyx"] = "xyxy",
) -> GroundingParse:
    """The phrases of ``text`` with their boxes, in the format's own coordinates.

    Args:
        text: model output or training answer.
        fmt: ``"qwen2-vl"`` (``<|object_ref_start|>phrase<|object_ref_end|>`` then one
            or more ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``, 0-1000 grid);
            ``"qwen2.5-vl"`` (JSON ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}``
            objects or lists of them, absolute pixels, optionally in a markdown
            fence); ``"bins"`` (runs of location tokens such as ``<loc_12>``, 4 per
            box).
        errors: ``"raise"`` raises :class:`BoxFormatError` (a ``ValueError``) for the
            first malformed box; ``"report"`` skips it and lists it in ``.issues``
            (and never raises for the text itself).
        image_size: ``(width, height)``; for "qwen2.5-vl", pixel coordinates beyond
            it are errors (without it only negative ones are).
        num_bins: number of bins, required for "bins"; indices must be in ``[0, n)``.
        pattern: "bins" token template with one ``{}`` field (``"<loc_{}>"``,
            ``"<bin_{}>"``, ``"<loc{:04d}>"`` for PaliGemma).
        order: "bins" coordinate order: ``"xyxy"``, or ``"yxyx"`` (PaliGemma).

    Malformed box text: an unclosed box or phrase, a closing marker without its
    opening one, a wrong number of coordinates, a non-numeric, non-ASCII or
    out-of-range coordinate, ``x2 < x1`` / ``y2 < y1`` (every format writes the
    top-left corner first, so a reversed box is corrupt, not a different box), and
    for "qwen2.5-vl" a ``"bbox_2d"`` in broken JSON, JSON nested deeper than 100
    levels, or a ``"bbox_2d"``/``"label"`` key written twice in one object.
    """
    check_choice("fmt", fmt, FORMATS)
    check_choice("errors", errors, ("raise", "report"))
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    issues = IssueList(text)
    if fmt == "qwen2-vl":
        phrases = _parse_qwen2_vl(text, issues)
    elif fmt == "qwen2.5-vl":
        phrases = parse_qwen25_vl(text, issues, check_image_size(image_size, required=False))
    else:
        phrases = _parse_bins(text, issues, check_num_bins(num_bins), bin_affixes(pattern), check_order(order))
    found = tuple(sorted(issues.items, key=lambda issue: issue.offset))
    if errors == "raise" and found:
        raise BoxFormatError(found[0], fmt)
    return GroundingParse(tuple(phrases), found)


def parse_boxes(
    text: str,
    fmt: Format = "qwen2-vl",
    *,
    image_size: tuple[int, int] | None = None,
    num_bins: int | None = None,
    pattern: str = DEFAULT_BIN_PATTERN,
    order: Literal["xyxy", "yxyx"] = "xyxy",
) -> list[Box]:
    """Every box of ``text``, in text order, in the format's own coordinates.

    Raises :class:`BoxFormatError` (a ``ValueError``) on malformed box text; use
    ``parse_grounding(..., errors="report")`` to collect the problems instead. The
    options are those of :func:`parse_grounding`.
    """
    return parse_grounding(
        text, fmt, errors="raise", image_size=image_size, num_bins=num_bins, pattern=pattern, order=order
    ).boxes


# ------------------------------------------------------------------- qwen2-vl

_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")  # ASCII digits only (not \d)
_QWEN_MARK = re.compile(r"<\|(object_ref_start|object_ref_end|box_start|box_end)\|>")
_ATOM = re.compile(r"[^\s(),]+")


def _parse_qwen2_vl(text: str, issues: IssueList) -> list[GroundedPhrase]:
    """Scan the four markers left to right; boxes right after a phrase belong to it."""
    groups: list[GroundedPhrase] = []
    phrase: str | None = None
    group_at, group_end = -1, -1  # the open group: where it starts, where its last piece ends
    boxes: list[Box] = []
    i = 0
    while (mark := _QWEN_MARK.search(text, i)) is not None:
        kind, nxt = mark.group(1), _QWEN_MARK.search(text, mark.end())
        closer = "object_ref_end" if kind == "object_ref_start" else "box_end"
        if kind in ("object_ref_end", "box_end"):
            opener = REF_START if kind == "object_ref_end" else BOX_START
            issues.add(mark.start(), mark.end(), f"{mark.group(0)} without a matching {opener}")
            i = mark.end()
            continue
        if nxt is None or nxt.group(1) != closer:
            stop = len(text) if nxt is None else nxt.start()
            issues.add(mark.start(), stop, f"unclosed {mark.group(0)}")
            i = mark.end()
            continue
        adjacent = group_at >= 0 and not text[group_end : mark.start()].strip()
        if kind == "object_ref_start" or not adjacent:
            if group_at >= 0:
                groups.append(GroundedPhrase(phrase, tuple(boxes), group_at))
            group_at, boxes = mark.start(), []
            phrase = text[mark.end() : nxt.start()] if kind == "object_ref_start" else None
        if kind == "box_start":
            box = _qwen2_vl_box(text[mark.end() : nxt.start()], mark.start(), nxt.end(), issues)
            if box is not None:
                boxes.append(box)
        group_end = i = nxt.end()
    if group_at >= 0:
        groups.append(GroundedPhrase(phrase, tuple(boxes), group_at))
    return groups


def _qwen2_vl_box(content: str, start: int, end: int, issues: IssueList) -> Box | None:
    """``(x1,y1),(x2,y2)`` in linear time: split into atoms, then compare the punctuation.

    (A single regular expression with lazy ``\\S+?`` groups backtracks: quadratic in
    the length of a box whose content loops.)
    """
    atoms = _ATOM.findall(content)
    bad = next((atom for atom in atoms if not _NUMBER.fullmatch(atom)), None)
    if bad is not None:
        problem: str | None = _atom_problem(bad)
    elif len(atoms) != 4:
        problem = f"expected 4 coordinates (x1,y1),(x2,y2), found {len(atoms)}"
    elif "".join(content.split()) != "({},{}),({},{})".format(*atoms):
        problem = "expected the form (x1,y1),(x2,y2)"
    else:
        values = tuple(float(atom) for atom in atoms)
        problem = box_problem(values, (QWEN2_VL_GRID, QWEN2_VL_GRID), "the 0-1000 grid")
    if problem is not None:
        issues.add(start, end, problem)
        return None
    return values  # type: ignore[return-value]  # 4 atoms checked above; mypy sees tuple[float, ...]


def _atom_problem(atom: str) -> str:
    if any(char.isdigit() and not char.isascii() for char in atom):
        return f"coordinate {atom[:20]!r} has non-ASCII digits (only 0-9 write numbers)"
    return f"non-numeric coordinate {atom[:20]!r}"


# ----------------------------------------------------------------------- bins


def _parse_bins(
    text: str, issues: IssueList, num_bins: int, affixes: tuple[str, str], order: str
) -> list[GroundedPhrase]:
    """Runs of bin tokens (whitespace between them allowed), 4 tokens per box."""
    prefix, suffix = affixes
    # The index may not hold the first character of the prefix or of the suffix: a
    # greedy scan from one token then stops before the next, so the search is linear
    # for any pattern (a lazy "anything" index is quadratic on e.g. "[[[[" with "[{}]").
    banned = re.escape("".join(sorted({prefix[0], suffix[0], "<", ">"})))
    token = re.compile(re.escape(prefix) + rf"([^\s{banned}]*)" + re.escape(suffix))
    groups: list[GroundedPhrase] = []
    for run in _token_runs(text, token):
        start, end = run[0].start(), run[-1].end()
        if len(run) % 4:
            issues.add(start, end, f"expected 4 bin tokens per box, found a run of {len(run)}")
            continue
        for k in range(0, len(run), 4):
            box = _bin_box(run[k : k + 4], num_bins, order, issues)
            if box is not None:
                groups.append(GroundedPhrase(None, (box,), run[k].start()))
    return groups


def _token_runs(text: str, token: re.Pattern[str]) -> list[list[re.Match[str]]]:
    runs: list[list[re.Match[str]]] = []
    for match in token.finditer(text):
        if runs and not text[runs[-1][-1].end() : match.start()].strip():
            runs[-1].append(match)
        else:
            runs.append([match])
    return runs


def _bin_box(tokens: list[re.Match[str]], num_bins: int, order: str, issues: IssueList) -> Box | None:
    start, end = tokens[0].start(), tokens[-1].end()
    values = []
    for tok in tokens:
        index = tok.group(1)
        problem = digits_problem(index, "bin index")
        if problem is None and not _below(index, num_bins):
            problem = f"bin index {index[:20]} is outside [0, {num_bins})"
        if problem is not None:
            issues.add(tok.start(), tok.end(), problem)
            return None
        values.append(float(int(index)))
    if order == "yxyx":
        values = [values[1], values[0], values[3], values[2]]
    problem = box_problem(values, None, "bins")
    if problem is not None:
        issues.add(start, end, problem)
        return None
    return tuple(values)  # type: ignore[return-value]  # 4 values (one per coordinate tag); mypy sees tuple[float, ...]


def _below(digits: str, limit: int) -> bool:
    """``int(digits) < limit`` without converting a number of thousands of digits."""
    digits = digits.lstrip("0") or "0"
    return len(digits) <= len(str(limit)) and int(digits) < limit


# ----------------------------------------------------------------- formatting


def format_grounding(
    phrases: Sequence[GroundedPhrase],
    fmt: Format = "qwen2-vl",
    *,
    image_size: tuple[int, int] | None = None,
    num_bins: int | None = None,
    pattern: str = DEFAULT_BIN_PATTERN,
    order: Literal["xyxy", "yxyx"] = "xyxy",
) -> str:
    """Write phrases and their boxes as ``fmt`` text (the inverse of :func:`parse_grounding`).

    Boxes are in the format's own coordinates and are rounded to integers (half up).
    "qwen2-vl" writes ``<|object_ref_start|>phrase<|object_ref_end|>`` (when the
    phrase is not None) and then every box; "qwen2.5-vl" writes a fenced JSON list,
    one object per box, as Qwen2.5-VL does; "bins" writes 4 tokens per box and has
    no place for phrases (they must be None). The options are those of
    :func:`parse_grounding`; invalid boxes raise ``ValueError``.
    """
    check_choice("fmt", fmt, FORMATS)
    groups = [p if isinstance(p, GroundedPhrase) else GroundedPhrase(*p) for p in phrases]
    if fmt == "qwen2-vl":
        return "".join(_format_qwen2_vl(group) for group in groups)
    if fmt == "qwen2.5-vl":
        size = check_image_size(image_size, required=False)
        lines = [_format_json_entry(group.phrase, box, size) for group in groups for box in group.boxes]
        return "```json\n[\n" + ",\n".join(lines) + "\n]\n```"
    n, order = check_num_bins(num_bins), check_order(order)
    bin_affixes(pattern)  # validates; writing uses the pattern itself (it may hold a format spec)
    return "".join(_format_bin_box(group, box, n, pattern, order) for group in groups for box in group.boxes)


def format_boxes(
    boxes: Sequence[Sequence[float]],
    fmt: Format = "qwen2-vl",
    *,
    labels: Sequence[str | None] | None = None,
    image_size: tuple[int, int] | None = None,
    num_bins: int | None = None,
    pattern: str = DEFAULT_BIN_PATTERN,
    order: Literal["xyxy", "yxyx"] = "xyxy",
) -> str:
    """Write ``boxes`` (``[(x1, y1, x2, y2), ...]`` in the format's coordinates) as text.

    ``labels`` (one per box, or None) become the phrases; see :func:`format_grounding`.
    """
    if labels is not None and len(labels) != len(boxes):
        raise ValueError(f"labels has {len(labels)} entries but there are {len(boxes)} boxes")
    names = [None] * len(boxes) if labels is None else list(labels)
    # cast: _integer_box checks each box has 4 coordinates when it is written.
    groups = [GroundedPhrase(name, (cast(Box, tuple(box)),)) for name, box in zip(names, boxes)]
    return format_grounding(groups, fmt, image_size=image_size, num_bins=num_bins, pattern=pattern, order=order)


def _integer_box(box: Sequence[float], upper: tuple[float, float] | None, where: str) -> tuple[int, ...]:
    if len(box) != 4:
        raise ValueError(f"a box has 4 coordinates (x1, y1, x2, y2), got {len(box)}: {tuple(box)!r}")
    values = tuple(float(v) for v in box)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"box {values!r} has a non-finite coordinate")
    rounded = tuple(math.floor(v + 0.5) for v in values)
    problem = box_problem(rounded, upper, where)
    if problem is not None:
        raise ValueError(f"cannot write box {tuple(box)!r}: {problem}")
    return rounded


def _format_qwen2_vl(group: GroundedPhrase) -> str:
    ref = ""
    if group.phrase is not None:
        if any(mark in group.phrase for mark in (REF_START, REF_END, BOX_START, BOX_END)):
            raise ValueError(f"phrase {group.phrase!r} contains a Qwen2-VL grounding marker")
        ref = f"{REF_START}{group.phrase}{REF_END}"
    grid = (QWEN2_VL_GRID, QWEN2_VL_GRID)
    boxes = [_integer_box(box, grid, "the 0-1000 grid") for box in group.boxes]
    return ref + "".join(f"{BOX_START}({x1},{y1}),({x2},{y2}){BOX_END}" for x1, y1, x2, y2 in boxes)


def _format_json_entry(label: str | None, box: Sequence[float], size: tuple[int, int] | None) -> str:
    entry: dict[str, Any] = {"bbox_2d": list(_integer_box(box, size, "pixels"))}
    if label is not None:
        entry["label"] = label
    return "\t" + json.dumps(entry, ensure_ascii=False)


def _format_bin_box(group: GroundedPhrase, box: Sequence[float], num_bins: int, pattern: str, order: str) -> str:
    if group.phrase is not None:
        raise ValueError(f"the bins format has no place for phrases; got phrase {group.phrase!r}")
    x1, y1, x2, y2 = _integer_box(box, (num_bins - 1, num_bins - 1), f"{num_bins} bins")
    values = (x1, y1, x2, y2) if order == "xyxy" else (y1, x1, y2, x2)
    return "".join(pattern.format(v) for v in values)
