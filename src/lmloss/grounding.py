"""Boxes as tokens: grounding answers written as text, and box losses on them.

Vision-language models write a bounding box as text and learn it with plain
next-token cross-entropy. Qwen2-VL writes ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``
on a 0-1000 grid, so predicting 503 when the answer is 502 costs as much as
predicting 999: cross-entropy knows nothing of distance. This module gives the box
text a geometry, in four parts that follow the pipeline:

1. *Text*: :func:`parse_grounding`, :func:`parse_boxes`, :func:`format_boxes` and
   :func:`format_grounding` read and write the common conventions ("qwen2-vl",
   "qwen2.5-vl" JSON in pixels, "bins" location tokens); :func:`convert_boxes` moves
   boxes between normalized ``[0, 1]``, grid (0-1000), pixel and bin coordinates.
   Malformed box text is never dropped silently: it raises a ``ValueError`` that
   quotes it with its character offset, or is listed in ``GroundingParse.issues``.
2. *Geometry*: :func:`box_iou`, :func:`giou`, :func:`l1_box_loss` and
   :func:`giou_loss`, elementwise over ``[..., 4]`` xyxy boxes, finite (and with
   finite gradients) for degenerate boxes.
3. *Positions*: :func:`find_box_targets` finds the positions of a ``[B, T]`` batch
   whose next-token targets are box coordinates (digit tokens inside
   ``<|box_start|>...<|box_end|>``, digit tokens of the pixel integers in a
   Qwen2.5-VL ``"bbox_2d": [...]`` list, or bin tokens), with the same shift as
   :func:`lmloss.causal_lm_loss`.
4. *Losses*: the expected value of each coordinate under the model's distribution
   over the digit or bin tokens (:func:`expected_bin_coordinate`,
   :func:`expected_number`) makes a box that L1 and GIoU can score. :func:`box_loss`
   computes logits only at the coordinate positions and only for the digit or bin
   tokens (a gather and a ``[K, D] @ [D, n_values]`` product), and
   :func:`grounding_loss` adds the terms to :func:`lmloss.linear_cross_entropy`.

All box losses work in normalized ``[0, 1]`` coordinates (Qwen2.5-VL pixels are
divided by the image size given to :func:`find_box_targets`), in float32 (float64
stays float64), whatever the input dtype.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lmloss._validation import check_bool, check_choice, check_tensor

__all__ = [
    "Box",
    "BoxFormatError",
    "BoxIssue",
    "BoxTargets",
    "BoxTokenIds",
    "FORMATS",
    "GroundedPhrase",
    "GroundingParse",
    "box_iou",
    "box_loss",
    "box_loss_from_logits",
    "convert_boxes",
    "expected_bin_coordinate",
    "expected_boxes",
    "expected_number",
    "find_box_targets",
    "format_boxes",
    "format_grounding",
    "giou",
    "giou_loss",
    "grounding_loss",
    "l1_box_loss",
    "parse_boxes",
    "parse_grounding",
]

Box = tuple[float, float, float, float]
Format = Literal["qwen2-vl", "qwen2.5-vl", "bins"]
FORMATS: tuple[str, ...] = ("qwen2-vl", "qwen2.5-vl", "bins")
Space = Literal["normalized", "grid", "pixels", "bins"]
SPACES: tuple[str, ...] = ("normalized", "grid", "pixels", "bins")
Reduction = Literal["mean", "sum", "none"]

REF_START, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
QWEN2_VL_GRID = 1000
DEFAULT_BIN_PATTERN = "<loc_{}>"
# Added to the union and the enclosing area: turns the 0/0 of zero-area boxes into 0
# (the IoU of empty boxes is 0) and keeps gradients finite. torchvision's value; it
# is negligible against any box larger than ~1e-3 of the image side in normalized
# units (area 1e-6); pass a smaller eps for smaller boxes.
DEFAULT_EPS = 1e-7
_SNIPPET = 80


# --------------------------------------------------------------------------- text


@dataclass(frozen=True)
class BoxIssue:
    """One piece of malformed box text.

    Attributes:
        offset: character offset of the offending text in the parsed string.
        text: the offending text (cut at 80 characters).
        problem: what is wrong with it.
    """

    offset: int
    text: str
    problem: str

    def __str__(self) -> str:
        return f"{self.problem}: {self.text!r} at character {self.offset}"


class BoxFormatError(ValueError):
    """Malformed box text; ``.issue`` holds the offset, the text and the problem."""

    def __init__(self, issue: BoxIssue, fmt: str) -> None:
        super().__init__(f"malformed {fmt} box text: {issue}")
        self.issue = issue


@dataclass(frozen=True)
class GroundedPhrase:
    """A phrase and the boxes that ground it.

    Attributes:
        phrase: the referring text (``<|object_ref_start|>`` contents, or the JSON
            ``"label"``); ``None`` when the boxes come without one.
        boxes: ``(x1, y1, x2, y2)`` boxes in the format's own coordinates (0-1000 grid
            for "qwen2-vl", pixels for "qwen2.5-vl", bin indices for "bins").
        offset: character offset where the phrase (or its first box) starts.
    """

    phrase: str | None
    boxes: tuple[Box, ...]
    offset: int = 0


@dataclass(frozen=True)
class GroundingParse:
    """What :func:`parse_grounding` found: phrases with boxes, and malformed box text."""

    phrases: tuple[GroundedPhrase, ...]
    issues: tuple[BoxIssue, ...]

    @property
    def boxes(self) -> list[Box]:
        """Every box, in text order."""
        return [box for group in self.phrases for box in group.boxes]


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
            first malformed box; ``"report"`` skips it and lists it in ``.issues``.
        image_size: ``(width, height)``; for "qwen2.5-vl", pixel coordinates beyond
            it are errors (without it only negative ones are).
        num_bins: number of bins, required for "bins"; indices must be in ``[0, n)``.
        pattern: "bins" token template with one ``{}`` field (``"<loc_{}>"``,
            ``"<bin_{}>"``, ``"<loc{:04d}>"`` for PaliGemma).
        order: "bins" coordinate order: ``"xyxy"``, or ``"yxyx"`` (PaliGemma).

    Malformed box text: an unclosed box or phrase, a closing marker without its
    opening one, a wrong number of coordinates, a non-numeric or out-of-range
    coordinate, or ``x2 < x1`` / ``y2 < y1`` (every format writes the top-left corner
    first, so a reversed box is corrupt, not a different box).
    """
    check_choice("fmt", fmt, FORMATS)
    check_choice("errors", errors, ("raise", "report"))
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    issues = _Issues(text)
    if fmt == "qwen2-vl":
        phrases = _parse_qwen2_vl(text, issues)
    elif fmt == "qwen2.5-vl":
        phrases = _parse_qwen25_vl(text, issues, _check_image_size(image_size, required=False))
    else:
        phrases = _parse_bins(text, issues, _check_num_bins(num_bins), _bin_affixes(pattern), _check_order(order))
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


class _Issues:
    """Collects malformed spans of one text (the caller decides to raise or report)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.items: list[BoxIssue] = []

    def add(self, start: int, end: int, problem: str) -> None:
        snippet = self.text[start : min(max(end, start + 1), start + _SNIPPET)]
        self.items.append(BoxIssue(start, snippet, problem))


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_QWEN_MARK = re.compile(r"<\|(object_ref_start|object_ref_end|box_start|box_end)\|>")
_QWEN_BOX = re.compile(r"\s*\(\s*(\S+?)\s*,\s*(\S+?)\s*\)\s*,\s*\(\s*(\S+?)\s*,\s*(\S+?)\s*\)\s*")


def _parse_qwen2_vl(text: str, issues: _Issues) -> list[GroundedPhrase]:
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


def _qwen2_vl_box(content: str, start: int, end: int, issues: _Issues) -> Box | None:
    atoms = re.findall(r"[^\s(),]+", content)
    bad = [atom for atom in atoms if not _NUMBER.fullmatch(atom)]
    match = _QWEN_BOX.fullmatch(content)
    if bad:
        problem: str | None = f"non-numeric coordinate {bad[0]!r}"
    elif len(atoms) != 4:
        problem = f"expected 4 coordinates (x1,y1),(x2,y2), found {len(atoms)}"
    elif match is None:
        problem = "expected the form (x1,y1),(x2,y2)"
    else:
        values = tuple(float(v) for v in match.groups())
        problem = _box_problem(values, (QWEN2_VL_GRID, QWEN2_VL_GRID), "the 0-1000 grid")
    if problem is not None:
        issues.add(start, end, problem)
        return None
    return values  # type: ignore[return-value]


def _box_problem(values: Sequence[float], upper: tuple[float, float] | None, where: str) -> str | None:
    """Why ``values`` (x1, y1, x2, y2) is not a valid box, or None."""
    for axis, value in zip("xyxy", values):
        limit = None if upper is None else upper[0 if axis == "x" else 1]
        if not math.isfinite(value) or value < 0 or (limit is not None and value > limit):
            allowed = "[0, inf)" if limit is None else f"[0, {limit:g}]"
            return f"coordinate {value:g} is outside {allowed} ({where})"
    if values[2] < values[0]:
        return f"x2 = {values[2]:g} < x1 = {values[0]:g} (boxes are written top-left corner first)"
    if values[3] < values[1]:
        return f"y2 = {values[3]:g} < y1 = {values[1]:g} (boxes are written top-left corner first)"
    return None


_BBOX_KEY = re.compile(r'"bbox_2d"\s*:')
_JSON_OPEN = re.compile(r"[\[{]")


def _parse_qwen25_vl(text: str, issues: _Issues, image_size: tuple[int, int] | None) -> list[GroundedPhrase]:
    """Decode every JSON value that holds ``"bbox_2d"``; report keys in undecodable JSON.

    Each ``[`` or ``{`` is tried as the start of a JSON value; prose brackets simply
    fail to decode and are skipped. A ``"bbox_2d"`` key that no decoded value covers
    (truncated or broken JSON) is reported, so nothing is lost silently.
    """
    decoder = json.JSONDecoder()
    keys = [m.start() for m in _BBOX_KEY.finditer(text)]
    groups: list[GroundedPhrase] = []
    covered: list[tuple[int, int]] = []
    failures: list[tuple[int, json.JSONDecodeError]] = []
    i = 0
    while (opening := _JSON_OPEN.search(text, i)) is not None:
        start = opening.start()
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as error:
            failures.append((start, error))
            i = start + 1
            continue
        span_keys = [k for k in keys if start <= k < end]
        if span_keys:
            covered.append((start, end))
            groups.extend(_bbox_entries(value, start, end, text, issues, image_size))
        i = end
    _report_uncovered(keys, covered, failures, issues)
    return groups


def _bbox_entries(
    value: Any, start: int, end: int, text: str, issues: _Issues, image_size: tuple[int, int] | None
) -> Iterator[GroundedPhrase]:
    """One GroundedPhrase per object with a ``"bbox_2d"``, in the text order of that key.

    ``value`` was decoded from ``text[start:end]``; each object is reported at the
    ``{`` that opens it (found by scanning the text, so a parent whose key follows a
    nested object's is not given the nested object's offset).
    """
    entries = list(_dicts_with_bbox(value))
    owners = _bbox_key_owners(text, start, end)
    for n, entry in enumerate(entries):
        # Both lists follow the text order of the keys; they differ in length only for
        # JSON that Python reads differently (e.g. a key written twice in one object).
        at = owners[n] if len(owners) == len(entries) else start
        box, problem = _json_box(entry, image_size)
        if problem is not None:
            issues.add(at, _json_end(text, at), problem)
            continue
        yield GroundedPhrase(entry.get("label"), (box,), at)  # type: ignore[arg-type]


def _json_end(text: str, start: int) -> int:
    """Where the JSON value starting at ``start`` ends (to quote just that object)."""
    try:
        return json.JSONDecoder().raw_decode(text, start)[1]
    except json.JSONDecodeError:
        return start + _SNIPPET


def _dicts_with_bbox(value: Any) -> Iterator[dict[str, Any]]:
    """The objects holding ``"bbox_2d"``, in the text order of that key.

    An object is yielded where its key stands among its siblings: after the nested
    objects written before the key, before those written after it (decoded JSON
    objects keep the text order of their keys).
    """
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "bbox_2d":
                yield value
            if isinstance(item, (dict, list)):
                yield from _dicts_with_bbox(item)
    elif isinstance(value, list):
        for item in value:
            yield from _dicts_with_bbox(item)


def _bbox_key_owners(text: str, start: int, end: int) -> list[int]:
    """Offsets of the ``{`` of each object with a ``"bbox_2d"`` key in valid JSON ``text[start:end]``.

    In the text order of the keys, one per object (a repeated key counts once, as
    in the decoded object), matching :func:`_dicts_with_bbox`.
    """
    owners: list[int] = []
    stack: list[int] = []  # offsets of the open containers
    i = start
    while i < end:
        char = text[i]
        if char == '"':
            close = _string_end(text, i)
            if stack and text[stack[-1]] == "{" and stack[-1] not in owners and _is_bbox_key(text, i, close):
                owners.append(stack[-1])
            i = close
            continue
        if char in "[{":
            stack.append(i)
        elif char in "]}" and stack:
            stack.pop()
        i += 1
    return owners


def _string_end(text: str, quote: int) -> int:
    """The offset just after the JSON string that opens at ``quote``."""
    i = quote + 1
    while i < len(text) and text[i] != '"':
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _is_bbox_key(text: str, start: int, end: int) -> bool:
    """Whether the string ``text[start:end]`` is a ``"bbox_2d"`` key (followed by ``:``)."""
    if json.loads(text[start:end]) != "bbox_2d":
        return False
    colon = end
    while colon < len(text) and text[colon].isspace():
        colon += 1
    return colon < len(text) and text[colon] == ":"


def _json_box(entry: dict[str, Any], image_size: tuple[int, int] | None) -> tuple[Box | None, str | None]:
    bbox, label = entry["bbox_2d"], entry.get("label")
    if label is not None and not isinstance(label, str):
        return None, f'"label" must be a string, got {label!r}'
    if not isinstance(bbox, list):
        return None, f'"bbox_2d" must be a list [x1, y1, x2, y2], got {bbox!r}'
    bad = [v for v in bbox if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad:
        return None, f"non-numeric coordinate {bad[0]!r}"
    if len(bbox) != 4:
        return None, f'expected 4 coordinates in "bbox_2d" [x1, y1, x2, y2], found {len(bbox)}'
    values = tuple(float(v) for v in bbox)
    problem = _box_problem(values, image_size, "pixels" if image_size is None else f"a {image_size} image")
    return (None, problem) if problem else (values, None)  # type: ignore[return-value]


def _report_uncovered(
    keys: list[int],
    covered: list[tuple[int, int]],
    failures: list[tuple[int, json.JSONDecodeError]],
    issues: _Issues,
) -> None:
    reported_until = -1
    for key in keys:
        if any(a <= key < b for a, b in covered) or key < reported_until:
            continue
        # Blame the outermost failed JSON value that starts after the last good one.
        last_good = max((b for a, b in covered if b <= key), default=0)
        starts = [(s, e) for s, e in failures if last_good <= s <= key]
        at, error = starts[0] if starts else (key, None)
        reason = f" ({error.msg}, position {error.pos})" if error is not None else ""
        issues.add(at, key + 40, f'"bbox_2d" in invalid JSON{reason}')
        reported_until = key + 1


def _parse_bins(
    text: str, issues: _Issues, num_bins: int, affixes: tuple[str, str], order: str
) -> list[GroundedPhrase]:
    """Runs of bin tokens (whitespace between them allowed), 4 tokens per box."""
    prefix, suffix = affixes
    token = re.compile(re.escape(prefix) + r"([^\s<>]*?)" + re.escape(suffix))
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


def _bin_box(tokens: list[re.Match[str]], num_bins: int, order: str, issues: _Issues) -> Box | None:
    start, end = tokens[0].start(), tokens[-1].end()
    for tok in tokens:
        if not tok.group(1).isdecimal():
            issues.add(tok.start(), tok.end(), f"non-numeric bin index {tok.group(1)!r}")
            return None
        if int(tok.group(1)) >= num_bins:
            issues.add(tok.start(), tok.end(), f"bin index {int(tok.group(1))} is outside [0, {num_bins})")
            return None
    values = [float(tok.group(1)) for tok in tokens]
    if order == "yxyx":
        values = [values[1], values[0], values[3], values[2]]
    problem = _box_problem(values, None, "bins")
    if problem is not None:
        issues.add(start, end, problem)
        return None
    return tuple(values)  # type: ignore[return-value]


def _bin_affixes(pattern: object) -> tuple[str, str]:
    """The literal text before and after the one ``{}`` field of a bin pattern."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str such as '<loc_{{}}>', got {type(pattern).__name__}")
    try:
        parts = list(string.Formatter().parse(pattern))
    except ValueError as error:
        raise ValueError(f"pattern {pattern!r} is not a format string: {error}") from None
    fields = [p for p in parts if p[1] is not None]
    if len(fields) != 1 or fields[0][1] not in ("", "0"):
        raise ValueError(f"pattern {pattern!r} must have exactly one '{{}}' field for the bin index")
    index = parts.index(fields[0])
    prefix = "".join(p[0] for p in parts[: index + 1])
    suffix = "".join(p[0] for p in parts[index + 1 :])
    if not prefix or not suffix:
        raise ValueError(f"pattern {pattern!r} needs literal text before and after '{{}}' (e.g. '<loc_{{}}>')")
    return prefix, suffix


def _check_num_bins(num_bins: object) -> int:
    if num_bins is None:
        raise ValueError("the bins format needs num_bins (the number of location tokens)")
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
    return num_bins


def _check_order(order: object) -> str:
    check_choice("order", order, ("xyxy", "yxyx"))
    return order  # type: ignore[return-value]


def _check_image_size(image_size: object, *, required: bool) -> tuple[int, int] | None:
    if image_size is None:
        if required:
            raise ValueError("pixel coordinates need image_size=(width, height)")
        return None
    ok = isinstance(image_size, (tuple, list)) and len(image_size) == 2
    if not ok or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0 for v in image_size):
        raise ValueError(f"image_size must be (width, height) with positive sizes, got {image_size!r}")
    return (image_size[0], image_size[1])  # type: ignore[index]


# ------------------------------------------------------------------ formatting


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
        size = _check_image_size(image_size, required=False)
        lines = [_format_json_entry(group.phrase, box, size) for group in groups for box in group.boxes]
        return "```json\n[\n" + ",\n".join(lines) + "\n]\n```"
    n, order = _check_num_bins(num_bins), _check_order(order)
    _bin_affixes(pattern)  # validates; writing uses the pattern itself (it may hold a format spec)
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
    groups = [GroundedPhrase(name, (tuple(box),)) for name, box in zip(names, boxes)]  # type: ignore[arg-type]
    return format_grounding(groups, fmt, image_size=image_size, num_bins=num_bins, pattern=pattern, order=order)


def _integer_box(box: Sequence[float], upper: tuple[float, float] | None, where: str) -> tuple[int, ...]:
    if len(box) != 4:
        raise ValueError(f"a box has 4 coordinates (x1, y1, x2, y2), got {len(box)}: {tuple(box)!r}")
    values = tuple(float(v) for v in box)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"box {values!r} has a non-finite coordinate")
    rounded = tuple(int(math.floor(v + 0.5)) for v in values)
    problem = _box_problem(rounded, upper, where)
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


# ------------------------------------------------------------------ coordinates


def convert_boxes(
    boxes: torch.Tensor | Sequence[Sequence[float]],
    *,
    src: Space,
    dst: Space,
    image_size: tuple[int, int] | None = None,
    grid_size: int = QWEN2_VL_GRID,
    num_bins: int | None = None,
) -> Any:
    """Move xyxy boxes between coordinate spaces.

    Spaces: ``"normalized"`` (``[0, 1]`` of the image), ``"grid"`` (``[0, grid_size]``,
    Qwen2-VL's 0-1000), ``"pixels"`` (needs ``image_size=(width, height)``) and
    ``"bins"`` (bin indices of ``num_bins`` equal bins; bin ``k`` covers
    ``[k/n, (k+1)/n)`` and reads back as its centre ``(k + 0.5)/n``).

    Args:
        boxes: ``[..., 4]`` tensor, or a sequence of 4-sequences.

    Returns:
        The same kind as ``boxes`` (a tensor of the same shape, or a list of
        tuples). Results are not rounded, except into ``"bins"`` (bin indices are
        integers: ``floor(x * n)`` clamped to ``[0, n-1]``).
    """
    check_choice("src", src, SPACES)
    check_choice("dst", dst, SPACES)
    as_list = not isinstance(boxes, torch.Tensor)
    tensor = torch.as_tensor(boxes, dtype=torch.float64) if as_list else boxes
    if tensor.ndim == 0 or tensor.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [..., 4], got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    normalized = _to_normalized(tensor, src, image_size, grid_size, num_bins)
    out = _from_normalized(normalized, dst, image_size, grid_size, num_bins)
    return [tuple(float(v) for v in row) for row in out.reshape(-1, 4).tolist()] if as_list else out


def _scale(tensor: torch.Tensor, space: str, image_size: object, grid_size: int) -> torch.Tensor:
    if space == "normalized":
        return tensor.new_ones(4)
    if space == "grid":
        if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 1:
            raise ValueError(f"grid_size must be an int >= 1, got {grid_size!r}")
        return tensor.new_full((4,), float(grid_size))
    width, height = _check_image_size(image_size, required=True)  # type: ignore[misc]
    return tensor.new_tensor([width, height, width, height])


def _to_normalized(tensor: torch.Tensor, src: str, image_size: object, grid_size: int, num_bins: object):
    if src == "bins":
        return (tensor + 0.5) / _check_num_bins(num_bins)
    return tensor / _scale(tensor, src, image_size, grid_size)


def _from_normalized(tensor: torch.Tensor, dst: str, image_size: object, grid_size: int, num_bins: object):
    if dst == "bins":
        n = _check_num_bins(num_bins)
        return torch.floor(tensor * n).clamp(0, n - 1)
    return tensor * _scale(tensor, dst, image_size, grid_size)


# --------------------------------------------------------------------- geometry


def _box_pair(pred: object, target: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Both boxes in the compute dtype (float64 stays float64, else float32), broadcast."""
    pred, target = check_tensor("pred", pred), check_tensor("target", target)
    for name, t in (("pred", pred), ("target", target)):
        if t.ndim == 0 or t.shape[-1] != 4:
            raise ValueError(f"{name} must have shape [..., 4] (x1, y1, x2, y2), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    try:
        shape = torch.broadcast_shapes(pred.shape, target.shape)
    except RuntimeError:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} boxes must have broadcastable shapes"
        ) from None
    dtype = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    return pred.to(dtype).expand(shape), target.to(dtype).expand(shape)


def _area(box: torch.Tensor) -> torch.Tensor:
    # A reversed box (x2 < x1) has no area: clamping keeps union >= intersection >= 0,
    # so early-training predictions with crossed corners cannot make IoU negative.
    return (box[..., 2] - box[..., 0]).clamp_min(0) * (box[..., 3] - box[..., 1]).clamp_min(0)


def _overlap(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas, ``[...]``."""
    low = torch.maximum(pred[..., :2], target[..., :2])
    high = torch.minimum(pred[..., 2:], target[..., 2:])
    side = (high - low).clamp_min(0)
    inter = side[..., 0] * side[..., 1]
    return inter, _area(pred) + _area(target) - inter


def box_iou(pred: torch.Tensor, target: torch.Tensor, *, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Elementwise intersection over union of xyxy boxes.

    Unlike ``torchvision.ops.box_iou`` (all pairs), box ``i`` of ``pred`` is compared
    with box ``i`` of ``target``.

    Args:
        pred: ``[..., 4]`` boxes (x1, y1, x2, y2), any float dtype.
        target: ``[..., 4]`` boxes, broadcastable with ``pred``.
        eps: added to the union: zero-area boxes get IoU 0 (not 0/0) and a finite
            gradient. Reversed boxes (x2 < x1) count as empty.

    Returns:
        ``[...]`` IoU in ``[0, 1]``, float32 (float64 for float64 input).
    """
    pred, target = _box_pair(pred, target)
    inter, union = _overlap(pred, target)
    return inter / (union + eps)


def giou(pred: torch.Tensor, target: torch.Tensor, *, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Elementwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes.

    ``GIoU = IoU - (C - U) / C`` with ``C`` the area of the smallest box enclosing
    both and ``U`` their union. Unlike IoU it keeps a gradient for disjoint boxes
    (it falls towards -1 as they move apart).

    Args:
        pred, target: ``[..., 4]`` boxes (broadcastable), any float dtype.
        eps: added to the union and to ``C`` (see :func:`box_iou`): two identical
            points give 0, not 0/0.

    Returns:
        ``[...]`` values in ``[-1, 1]``, float32 (float64 for float64 input).
    """
    pred, target = _box_pair(pred, target)
    inter, union = _overlap(pred, target)
    low = torch.minimum(pred[..., :2], target[..., :2])
    high = torch.maximum(pred[..., 2:], target[..., 2:])
    side = (high - low).clamp_min(0)
    enclosing = side[..., 0] * side[..., 1]
    return inter / (union + eps) - (enclosing - union) / (enclosing + eps)


def l1_box_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: Reduction = "mean",
    num_boxes: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """L1 distance of boxes: the sum over the 4 coordinates of ``|pred - target|``.

    As in DETR, each box contributes the sum of its 4 coordinate errors and
    ``"mean"`` divides by the number of boxes (not of coordinates).

    Args:
        pred, target: ``[..., 4]`` boxes (broadcastable), any float dtype.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[...]`` per box).
        num_boxes: the divisor of ``"mean"`` (e.g. the boxes of the whole optimizer
            step, across micro-batches); default: the boxes given here.

    Returns:
        float32 (float64 for float64 input); an attached 0 when there is no box.
    """
    pred, target = _box_pair(pred, target)
    return _reduce((pred - target).abs().sum(-1), reduction, num_boxes)


def giou_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: Reduction = "mean",
    num_boxes: int | float | torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """``1 - giou(pred, target)`` per box, in ``[0, 2]``; options as in :func:`l1_box_loss`."""
    return _reduce(1.0 - giou(pred, target, eps=eps), reduction, num_boxes)


def _reduce(per_box: torch.Tensor, reduction: object, num_boxes: object) -> torch.Tensor:
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    if reduction == "none":
        return per_box
    total = per_box.sum()
    if reduction == "sum":
        return total
    divisor = _num_boxes(num_boxes, per_box.numel(), total)
    # where() on the divisor keeps the no-box case an exact, attached 0 (never 0/0).
    return total / torch.where(divisor > 0, divisor, torch.ones_like(divisor))


def _num_boxes(num_boxes: object, default: int, like: torch.Tensor) -> torch.Tensor:
    if num_boxes is None:
        return like.new_tensor(float(default))
    if isinstance(num_boxes, torch.Tensor):
        if num_boxes.numel() != 1:
            raise ValueError(f"num_boxes must hold one number, got shape {tuple(num_boxes.shape)}")
        return num_boxes.detach().reshape(()).to(like)
    if isinstance(num_boxes, bool) or not isinstance(num_boxes, numbers.Real):
        raise ValueError(f"num_boxes must be a number or a tensor, got {type(num_boxes).__name__}")
    if not math.isfinite(num_boxes) or num_boxes < 0:
        raise ValueError(f"num_boxes must be finite and >= 0, got {num_boxes}")
    return like.new_tensor(float(num_boxes))


# -------------------------------------------------------------------- positions


@dataclass(frozen=True)
class BoxTokenIds:
    """The token ids that carry box coordinates.

    Attributes:
        kind: ``"digits"`` (Qwen2-VL: each coordinate written as decimal digits, one
            digit per token, inside ``box_start_id ... box_end_id``), ``"json"``
            (Qwen2.5-VL: ``"bbox_2d": [x1, y1, x2, y2]`` in absolute pixels, each
            number written as decimal digits, one digit per token) or ``"bins"``
            (one location token per coordinate, 4 consecutive tokens per box).
        value_ids: the ids of the digits ``0..9`` (digits, json) or of bins ``0..n-1``.
        box_start_id, box_end_id: the box delimiters (digits only).
        grid_size: digits: the coordinate grid (1000 for Qwen2-VL); the normalized
            coordinate is ``number / grid_size``.
        merged_digit_ids: ids of tokens that hold a digit but are not one digit
            (e.g. ``"12"``, ``" 5"``); such a token inside a box is an error,
            because the per-digit expectation needs one digit per token.
        order: bins: ``"xyxy"`` or ``"yxyx"`` (PaliGemma).
        token_text: json: the text of a token id (e.g. its decoded string). The
            ``"bbox_2d"`` key is tokenized differently in different contexts
            (``{"`` + ``bbox`` or `` "`` + ``bbox``), so it is found in the text of the
            row, not by matching ids.
    """

    kind: Literal["digits", "json", "bins"]
    value_ids: tuple[int, ...]
    box_start_id: int | None = None
    box_end_id: int | None = None
    grid_size: int = QWEN2_VL_GRID
    merged_digit_ids: frozenset[int] = frozenset()
    order: Literal["xyxy", "yxyx"] = "xyxy"
    token_text: Callable[[int], str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, ("digits", "json", "bins"))
        _check_order(self.order)
        ids = tuple(self.value_ids)
        if len(set(ids)) != len(ids) or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(f"value_ids must be distinct non-negative token ids, got {ids!r}")
        if self.kind in ("digits", "json") and len(ids) != 10:
            raise ValueError(f"{self.kind} needs the 10 token ids of '0'..'9', got {len(ids)}")
        if self.kind == "json":
            if not callable(self.token_text):
                raise ValueError("json needs token_text (token id -> its text) to find the \"bbox_2d\" keys")
        elif self.kind == "digits":
            if self.box_start_id is None or self.box_end_id is None:
                raise ValueError("digits need box_start_id and box_end_id (the box delimiters)")
            if {self.box_start_id, self.box_end_id} & set(ids):
                raise ValueError("the box delimiters cannot be digit tokens")
        elif not ids:
            raise ValueError("bins need at least one bin token id")

    @classmethod
    def digits(
        cls,
        digit_ids: Sequence[int],
        box_start_id: int,
        box_end_id: int,
        *,
        grid_size: int = QWEN2_VL_GRID,
        merged_digit_ids: Sequence[int] = (),
    ) -> BoxTokenIds:
        """Digit tokens (ids of ``'0'..'9'`` in order) between two delimiter tokens."""
        return cls("digits", tuple(int(i) for i in digit_ids), int(box_start_id), int(box_end_id), grid_size,
                   frozenset(int(i) for i in merged_digit_ids))

    @classmethod
    def json_digits(cls, digit_ids: Sequence[int], token_text: Mapping[int, str] | Callable[[int], str]) -> BoxTokenIds:
        """Qwen2.5-VL JSON boxes: digit tokens (ids of ``'0'..'9'`` in order) and the text of every token.

        ``token_text`` maps a token id to its text: a dict, or a function such as
        ``lambda i: tokenizer.decode([i])`` (:meth:`from_tokenizer` builds a cached one).
        """
        text_of = _MappingText(token_text) if isinstance(token_text, Mapping) else token_text
        return cls("json", tuple(int(i) for i in digit_ids), token_text=text_of)

    @classmethod
    def bins(cls, bin_ids: Sequence[int], *, order: Literal["xyxy", "yxyx"] = "xyxy") -> BoxTokenIds:
        """Location tokens, ``bin_ids[k]`` being bin ``k``."""
        return cls("bins", tuple(int(i) for i in bin_ids), order=order)

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        fmt: Format = "qwen2-vl",
        *,
        num_bins: int | None = None,
        pattern: str = DEFAULT_BIN_PATTERN,
        order: Literal["xyxy", "yxyx"] = "xyxy",
    ) -> BoxTokenIds:
        """Look the ids up in a transformers tokenizer (its vocabulary must hold them).

        "qwen2-vl": ``<|box_start|>``, ``<|box_end|>`` and the digits, each of which
        must encode to one token (as Qwen2's pre-tokenizer guarantees). "qwen2.5-vl":
        the digits, and ``tokenizer.decode([id])`` (cached) as the text of a token; a
        coordinate digit that shares its token with other characters is reported by
        :func:`find_box_targets`. "bins": ``pattern.format(k)`` for ``k < num_bins``,
        each one token.
        """
        check_choice("fmt", fmt, FORMATS)
        if fmt == "bins":
            _bin_affixes(pattern)
            names = [pattern.format(k) for k in range(_check_num_bins(num_bins))]
            return cls.bins([_single_token_id(tokenizer, name) for name in names], order=order)
        digits = [_single_token_id(tokenizer, str(d)) for d in range(10)]
        if fmt == "qwen2.5-vl":
            return cls.json_digits(digits, _DecodedText(tokenizer))
        vocab = tokenizer.get_vocab()
        merged = [i for tok, i in vocab.items() if i not in digits and any(c in "0123456789" for c in tok)]
        return cls.digits(digits, _single_token_id(tokenizer, BOX_START), _single_token_id(tokenizer, BOX_END),
                          merged_digit_ids=merged)


class _DecodedText:
    """``token id -> text`` through ``tokenizer.decode``, cached (a batch repeats its ids).

    A byte-level token that holds part of a multi-byte character decodes to U+FFFD:
    the row's text then differs from the decoded row there, but never in the ASCII
    of the ``"bbox_2d": [...]`` structure.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self.cache[token_id] = text
        return text


class _MappingText:
    """``token id -> text`` from a dict; an unknown id is a ``ValueError`` that names it."""

    def __init__(self, texts: Mapping[int, str]) -> None:
        self.texts = texts

    def __call__(self, token_id: int) -> str:
        if token_id not in self.texts:
            raise ValueError(f"token id {token_id} is not in token_text (it must give the text of every id)")
        return self.texts[token_id]


def _single_token_id(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"{text!r} encodes to {len(ids)} tokens {ids} with this tokenizer; box coordinates need it to be "
            "one token (add it as a token, or use a tokenizer that splits numbers into single digits)"
        )
    return int(ids[0])


@dataclass(frozen=True)
class BoxTargets:
    """Where the box coordinates of a batch are predicted, and what they should be.

    ``K`` is the number of coordinate tokens (positions), ``M`` the number of boxes.

    Attributes:
        positions: ``[K]`` flat indices into the ``B*T`` rows of the hidden states
            (or logits) of the batch: row ``b*T + t`` predicts the coordinate token
            (with ``shift=True``, ``t`` is the column before the token's column).
        box_index: ``[K]`` the box (``0..M-1``) of each position.
        coord_index: ``[K]`` 0, 1, 2, 3 for x1, y1, x2, y2.
        value_index: ``[K]`` the target value of the token: its digit (digits) or
            its bin (bins), an index into ``tokens.value_ids``.
        place: ``[K]`` the decimal place of the digit (``10**place``; 0 for bins).
        target_boxes: ``[M, 4]`` float32 target boxes, normalized to ``[0, 1]``.
        row_index: ``[M]`` the batch row of each box.
        tokens: the token ids used.
        shape: ``(B, T)`` of the batch.
        shift: the alignment convention the positions follow.
        divisor: ``[K]`` float32, digits and json: what a coordinate's number is
            divided by to normalize it (the grid size; the image width for x, height
            for y); ``None`` means ``tokens.grid_size``. Unused for bins.
    """

    positions: torch.Tensor
    box_index: torch.Tensor
    coord_index: torch.Tensor
    value_index: torch.Tensor
    place: torch.Tensor
    target_boxes: torch.Tensor
    row_index: torch.Tensor
    tokens: BoxTokenIds
    shape: tuple[int, int]
    shift: bool
    divisor: torch.Tensor | None = None

    @property
    def num_boxes(self) -> int:
        return int(self.target_boxes.shape[0])

    def to(self, device: torch.device | str) -> BoxTargets:
        """A copy with every tensor on ``device``."""
        moved = {name: getattr(self, name).to(device) for name in _TARGET_TENSORS}
        divisor = None if self.divisor is None else self.divisor.to(device)
        return BoxTargets(**moved, tokens=self.tokens, shape=self.shape, shift=self.shift, divisor=divisor)


_TARGET_TENSORS = ("positions", "box_index", "coord_index", "value_index", "place", "target_boxes", "row_index")


def find_box_targets(
    labels: torch.Tensor,
    tokens: BoxTokenIds,
    *,
    input_ids: torch.Tensor | None = None,
    shift: bool = True,
    ignore_index: int = -100,
    on_error: Literal["raise", "skip"] = "raise",
    image_size: tuple[float, float] | Sequence[tuple[float, float]] | torch.Tensor | None = None,
) -> BoxTargets:
    """Find the positions whose next-token targets are box coordinates.

    Runs in Python on the CPU: call it when the batch is built (collator, data
    loader), not in the training step.

    Qwen2.5-VL (``tokens.kind == "json"``): the coordinates are the digits of the 4
    integers of each ``"bbox_2d": [x1, y1, x2, y2]`` list (numbers of any length),
    found in the text of the row (the tokens' texts joined). They are pixels of the
    image as the model saw it, so ``image_size`` is required and the target boxes
    are normalized by it (x by the width, y by the height), as the other formats
    are: the box losses then mean the same in every format and at every
    resolution (in pixels, the L1 term would grow with the image and swamp the
    cross-entropy and the GIoU term at NExT-Chat's weights; GIoU itself does not
    care), and :func:`box_loss` divides the expected numbers by the same sizes.

    Args:
        labels: ``[B, T]`` labels as for :func:`lmloss.causal_lm_loss` (input ids with
            ``ignore_index`` where nothing is trained).
        tokens: which ids carry coordinates (:class:`BoxTokenIds`).
        input_ids: ``[B, T]`` optional; the box structure (delimiters, runs of bin
            tokens) is read from them when given, so a box whose delimiters are
            masked out of the labels is still found. Default: read it from ``labels``.
        shift: as in :func:`lmloss.causal_lm_loss`: with ``True`` the token in column
            ``t`` is predicted by position ``t-1``.
        ignore_index: the label value that is never a target.
        on_error: ``"raise"`` (a ``ValueError`` naming the row and column) or
            ``"skip"`` for a malformed box: unclosed (e.g. cut by truncation), a
            wrong number of coordinates, a merged digit token, a coordinate beyond
            the grid, reversed corners, or only some of its coordinates trained.
            A box with no trained coordinate (e.g. in the prompt) is not a target.
        image_size: json only, required: ``(width, height)`` in pixels of the image
            the coordinates refer to (for Qwen2.5-VL, the resized model input, not
            the original file), one pair for the whole batch or one per row
            (``[B, 2]``). A coordinate beyond it is a malformed box.

    Returns:
        :class:`BoxTargets` on the device of ``labels``.
    """
    labels = check_tensor("labels", labels)
    if labels.ndim != 2 or labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor of shape [B, T], got {labels.dtype} {tuple(labels.shape)}")
    if input_ids is not None and check_tensor("input_ids", input_ids).shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
    if not isinstance(tokens, BoxTokenIds):
        raise TypeError(f"tokens must be a BoxTokenIds, got {type(tokens).__name__}")
    check_bool("shift", shift)
    check_choice("on_error", on_error, ("raise", "skip"))
    sizes = _row_image_sizes(image_size, tokens.kind, labels.shape[0])
    rows_labels = labels.tolist()
    rows_ids = rows_labels if input_ids is None else input_ids.tolist()
    builder = _TargetBuilder(tokens, shift, ignore_index, on_error == "raise", labels.shape[1], sizes)
    for b, (ids, labs) in enumerate(zip(rows_ids, rows_labels)):
        for span in _spans(ids, tokens, ignore_index):
            builder.add(b, span, labs)
    return builder.build(labels.device, (labels.shape[0], labels.shape[1]))


def _spans(ids: list[int], tokens: BoxTokenIds, ignore_index: int) -> Iterator[_Span]:
    if tokens.kind == "digits":
        return _digit_boxes(ids, tokens)
    if tokens.kind == "json":
        return _json_boxes(ids, tokens, ignore_index)
    return _bin_boxes(ids, tokens)


def _row_image_sizes(image_size: object, kind: str, rows: int) -> list[tuple[float, float]] | None:
    """One ``(width, height)`` per row for json tokens; None (and nothing given) otherwise."""
    if kind != "json":
        if image_size is not None:
            raise ValueError(f"image_size is for Qwen2.5-VL pixel boxes (json tokens), not {kind} tokens")
        return None
    if image_size is None:
        raise ValueError("Qwen2.5-VL boxes are in pixels: find_box_targets needs image_size=(width, height)")
    sizes = image_size.tolist() if isinstance(image_size, torch.Tensor) else image_size
    if isinstance(sizes, (tuple, list)) and len(sizes) == 2 and all(isinstance(v, numbers.Real) for v in sizes):
        sizes = [sizes] * rows
    if not isinstance(sizes, (tuple, list)) or len(sizes) != rows:
        raise ValueError(
            f"image_size must be (width, height) or one such pair per row ({rows} rows), got {image_size!r}"
        )
    return [_check_image_size(size, required=True) for size in sizes]  # type: ignore[misc]


@dataclass
class _Span:
    """One box found in a row, in columns ``[start, end)``.

    ``coords`` holds 4 lists of columns (the digits of each number; one column per
    coordinate for bins); ``problem`` says why the box is malformed, if it is.
    """

    start: int
    end: int
    coords: list[list[int]]
    problem: str | None = None


def _digit_boxes(ids: list[int], tokens: BoxTokenIds) -> Iterator[_Span]:
    digits, merged = set(tokens.value_ids), tokens.merged_digit_ids
    t = 0
    while t < len(ids):
        if ids[t] != tokens.box_start_id:
            if ids[t] == tokens.box_end_id:
                yield _Span(t, t + 1, [], "a box end token without a box start token")
            t += 1
            continue
        end = t + 1
        while end < len(ids) and ids[end] not in (tokens.box_start_id, tokens.box_end_id):
            end += 1
        if end == len(ids) or ids[end] != tokens.box_end_id:
            yield _Span(t, end, [], "unclosed box (no box end token before the next box or the end of the row)")
            t = end
            continue
        yield _digit_span(ids, t, end, digits, merged)
        t = end + 1


def _digit_span(ids: list[int], start: int, end: int, digits: set[int], merged: frozenset[int]) -> _Span:
    numbers: list[list[int]] = []
    previous_digit = False
    for col in range(start + 1, end):
        if ids[col] in merged:
            problem = (f"token id {ids[col]} in column {col} holds several characters with a digit; "
                       "the expected-number loss needs one digit per token")
            return _Span(start, end + 1, [], problem)
        is_digit = ids[col] in digits
        if is_digit and not previous_digit:
            numbers.append([])
        if is_digit:
            numbers[-1].append(col)
        previous_digit = is_digit
    if len(numbers) != 4:
        return _Span(start, end + 1, numbers, f"expected 4 numbers in the box, found {len(numbers)}")
    return _Span(start, end + 1, numbers)


def _bin_boxes(ids: list[int], tokens: BoxTokenIds) -> Iterator[_Span]:
    bins = set(tokens.value_ids)
    t = 0
    while t < len(ids):
        if ids[t] not in bins:
            t += 1
            continue
        end = t
        while end < len(ids) and ids[end] in bins:
            end += 1
        if (end - t) % 4:
            yield _Span(t, end, [], f"a run of {end - t} bin tokens (4 per box)")
        else:
            for k in range(t, end, 4):
                yield _Span(k, k + 4, [[k], [k + 1], [k + 2], [k + 3]])
        t = end


_JSON_KEY = re.compile(r'"bbox_2d"\s*:\s*')
_JSON_NUMBERS = re.compile(r"\s*([0-9]+)\s*,\s*([0-9]+)\s*,\s*([0-9]+)\s*,\s*([0-9]+)\s*")


def _json_boxes(ids: list[int], tokens: BoxTokenIds, ignore_index: int) -> Iterator[_Span]:
    """Each ``"bbox_2d": [...]`` of a row, found in the row's text (the tokens' texts joined).

    Read from labels, an ``ignore_index`` column has no text: it stands as a NUL
    character, which no box structure can cross.
    """
    digits = set(tokens.value_ids)
    if not digits.intersection(ids):
        return  # no digit, no box: spare the row's text
    pieces = ["\0" if i == ignore_index else tokens.token_text(i) for i in ids]  # type: ignore[misc]
    text = "".join(pieces)
    owner = [t for t, piece in enumerate(pieces) for _ in piece]  # character -> column
    for key in _JSON_KEY.finditer(text):
        start = owner[key.start()]
        if text[key.end() : key.end() + 1] != "[":
            yield _Span(start, owner[key.end() - 1] + 1, [], '"bbox_2d" is not followed by a list [x1, y1, x2, y2]')
            continue
        close = _list_end(text, key.end())
        if close is None:
            yield _Span(start, len(ids), [], 'unclosed "bbox_2d" list (no "]" before the end of the row)')
            continue
        yield _json_span(text[key.end() + 1 : close], key.end() + 1, start, owner[close] + 1, pieces, owner, ids,
                         digits)


def _list_end(text: str, opening: int) -> int | None:
    """Offset of the ``]`` that closes the flat list opened at ``opening``, or None if cut off."""
    for i in range(opening + 1, len(text)):
        if text[i] == "]":
            return i
        if text[i] in "[{}":
            return None  # another structure starts: this list was never closed
    return None


def _json_span(
    content: str, at: int, start: int, end: int, pieces: list[str], owner: list[int], ids: list[int], digits: set[int]
) -> _Span:
    """The digit columns of ``[x1, y1, x2, y2]``, whose inside ``content`` starts at character ``at``."""
    match = _JSON_NUMBERS.fullmatch(content)
    if match is None:
        items = [item.strip() for item in content.split(",")] if content.strip() else []
        bad = [item for item in items if not re.fullmatch("[0-9]+", item)]
        problem = (f"coordinate {bad[0]!r} is not a non-negative integer written in digits" if bad
                   else f'expected 4 coordinates in "bbox_2d" [x1, y1, x2, y2], found {len(items)}')
        return _Span(start, end, [], problem)
    numbers: list[list[int]] = []
    for k in range(1, 5):
        columns = [owner[at + c] for c in range(match.start(k), match.end(k))]
        for col in columns:
            # The number's digits must be the digit tokens: a token such as " 5" or
            # "12" cannot be scored digit by digit.
            if ids[col] not in digits:
                problem = (f"token id {ids[col]} in column {col} is {pieces[col]!r}, not one digit token; "
                           "the expected-number loss needs one digit per token")
                return _Span(start, end, [], problem)
        numbers.append(columns)
    return _Span(start, end, numbers)


class _TargetBuilder:
    """Accumulates the boxes of a batch into the flat lists of :class:`BoxTargets`."""

    def __init__(
        self,
        tokens: BoxTokenIds,
        shift: bool,
        ignore_index: int,
        strict: bool,
        width: int,
        sizes: list[tuple[float, float]] | None,
    ) -> None:
        self.tokens, self.shift, self.ignore, self.strict, self.width = tokens, shift, ignore_index, strict, width
        self.sizes = sizes  # json: (width, height) of each row's image
        self.value_of = {tok: k for k, tok in enumerate(tokens.value_ids)}
        self.cols: dict[str, list[int]] = {k: [] for k in ("pos", "box", "coord", "value", "place")}
        self.divisors: list[float] = []
        self.boxes: list[list[float]] = []
        self.rows: list[int] = []

    def fail(self, b: int, col: int, problem: str) -> None:
        if self.strict:
            raise ValueError(f"box at row {b}, column {col}: {problem} (on_error='skip' skips such boxes)")

    def add(self, b: int, span: _Span, labs: list[int]) -> None:
        if span.problem is not None:
            # A broken span with no target in it is prompt text: not ours to judge.
            if any(self._is_target(c, labs) for c in range(span.start, span.end)):
                self.fail(b, span.start, span.problem)
            return
        columns = [c for coord in span.coords for c in coord]
        trained = [self._is_target(c, labs) for c in columns]
        if not any(trained):
            return  # a box in the prompt: not a target
        if not all(trained):
            self.fail(b, span.start, "only some of its coordinate tokens are targets (masked or at column 0)")
            return
        values = [[self.value_of.get(labs[c], -1) for c in coord] for coord in span.coords]
        if any(v < 0 for coord in values for v in coord):
            self.fail(b, span.start, "labels disagree with input_ids at a coordinate token")
            return
        raw, upper, where = self._raw_box(values, b)
        problem = _box_problem(raw, upper, where)
        if problem is not None:
            self.fail(b, span.start, problem)
            return
        self._record(b, span, values, raw)

    def _is_target(self, col: int, labs: list[int]) -> bool:
        return labs[col] != self.ignore and (col >= 1 or not self.shift)

    def _raw_box(self, values: list[list[int]], b: int) -> tuple[list[float], tuple[float, float], str]:
        """The box in the tokens' own units (bin indices, grid numbers or pixels), xyxy."""
        if self.tokens.kind == "bins":
            n = len(self.tokens.value_ids)
            box = [float(coord[0]) for coord in values]
            box = box if self.tokens.order == "xyxy" else [box[1], box[0], box[3], box[2]]
            return box, (n - 1, n - 1), f"{n} bins"
        box = [float(int("".join(map(str, coord)))) for coord in values]
        if self.tokens.kind == "json":
            width, height = self.sizes[b]  # type: ignore[index]
            return box, (width, height), f"a {width:g}x{height:g} image"
        grid = self.tokens.grid_size
        return box, (grid, grid), f"the 0-{grid} grid"

    def _divisors(self, b: int) -> tuple[float, float, float, float]:
        """What each of x1, y1, x2, y2 is divided by to land in [0, 1] (digits and json)."""
        if self.tokens.kind == "json":
            width, height = self.sizes[b]  # type: ignore[index]
            return (width, height, width, height)
        grid = float(self.tokens.grid_size)
        return (grid, grid, grid, grid)

    def _record(self, b: int, span: _Span, values: list[list[int]], raw: list[float]) -> None:
        m = len(self.boxes)
        order = (0, 1, 2, 3) if self.tokens.order == "xyxy" else (1, 0, 3, 2)
        digits = self.tokens.kind != "bins"
        divisors = self._divisors(b) if digits else (1.0, 1.0, 1.0, 1.0)
        for slot, (coord_cols, coord_values) in enumerate(zip(span.coords, values)):
            for j, (col, value) in enumerate(zip(coord_cols, coord_values)):
                self.cols["pos"].append(b * self.width + (col - 1 if self.shift else col))
                self.cols["box"].append(m)
                self.cols["coord"].append(order[slot])
                self.cols["value"].append(value)
                self.cols["place"].append(len(coord_cols) - 1 - j if digits else 0)
                self.divisors.append(divisors[order[slot]])
        if digits:
            box = [v / d for v, d in zip(raw, divisors)]
        else:
            box = [(v + 0.5) / len(self.tokens.value_ids) for v in raw]  # bin centres
        self.boxes.append(box)
        self.rows.append(b)

    def build(self, device: torch.device, shape: tuple[int, int]) -> BoxTargets:
        def longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        boxes = torch.tensor(self.boxes, dtype=torch.float32, device=device).reshape(-1, 4)
        c = self.cols
        divisor = torch.tensor(self.divisors, dtype=torch.float32, device=device)
        return BoxTargets(longs(c["pos"]), longs(c["box"]), longs(c["coord"]), longs(c["value"]),
                          longs(c["place"]), boxes, longs(self.rows), self.tokens, shape, self.shift, divisor)


# -------------------------------------------------------- expected coordinates


def _value_logits(logits: object, token_ids: object) -> torch.Tensor:
    """The logits of the value tokens only (``[..., n]``), in the compute dtype."""
    logits = check_tensor("logits", logits)
    if not logits.is_floating_point() or logits.ndim < 1:
        raise ValueError(f"logits must be a floating-point tensor [..., V], got {logits.dtype} {tuple(logits.shape)}")
    if token_ids is not None:
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=logits.device)
        if ids.ndim != 1 or ids.numel() == 0:
            raise ValueError(f"token ids must be a non-empty 1-D list, got shape {tuple(ids.shape)}")
        if bool((ids < 0).any()) or bool((ids >= logits.shape[-1]).any()):
            raise ValueError(f"token ids must be in [0, {logits.shape[-1]}) (the vocabulary of logits)")
        logits = logits.index_select(-1, ids)
    return logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)


def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def _expectation(z: torch.Tensor, values: torch.Tensor, temperature: float, straight_through: bool) -> torch.Tensor:
    """``sum_k softmax(z / T)_k * values_k``; straight-through: argmax value, soft gradient."""
    soft = torch.softmax(z / temperature, dim=-1) @ values
    if not straight_through:
        return soft
    hard = values[z.argmax(dim=-1)]
    return soft + (hard - soft).detach()


def expected_bin_coordinate(
    logits: torch.Tensor,
    bin_token_ids: Sequence[int] | torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    straight_through: bool = False,
) -> torch.Tensor:
    """Expected normalized coordinate under the distribution over location bins.

    ``c = sum_k softmax(z / T)_k * (k + 0.5) / n``: bin ``k`` of ``n`` stands for its
    centre on the normalized ``[0, 1]`` axis. The softmax is over the bin tokens only
    (the model is asked where, given that it writes a coordinate).

    Args:
        logits: ``[..., V]`` full-vocabulary logits (with ``bin_token_ids``) or
            ``[..., n_bins]`` bin logits (``bin_token_ids=None``), any float dtype.
        bin_token_ids: ``[n_bins]`` vocabulary ids of bins ``0..n-1``.
        temperature: ``T > 0``; lower is closer to the argmax.
        straight_through: return the centre of the argmax bin in the forward pass,
            with the gradient of the soft expectation.

    Returns:
        ``[...]`` coordinates in ``[0, 1]``, float32 (float64 for float64 logits).
    """
    z = _value_logits(logits, bin_token_ids)
    n = z.shape[-1]
    centres = (torch.arange(n, dtype=z.dtype, device=z.device) + 0.5) / n
    return _expectation(z, centres, _check_temperature(temperature), check_bool("straight_through", straight_through))


def expected_number(
    logits: torch.Tensor,
    digit_token_ids: Sequence[int] | torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Expected value of a number written with one digit per token.

    ``sum_j 10**(L-1-j) * sum_d p_j(d) * d`` over the ``L`` digit positions ``j``
    (most significant first), each ``p_j`` the softmax over the 10 digit tokens only.
    The number of digits is given (teacher forcing: the target's length).

    Args:
        logits: ``[..., L, V]`` logits of the positions that write the digits (with
            ``digit_token_ids``), or ``[..., L, 10]`` digit logits (without).
        digit_token_ids: ``[10]`` vocabulary ids of ``'0'..'9'``.
        temperature: ``T > 0`` of the softmax.

    Returns:
        ``[...]`` expected values, float32 (float64 for float64 logits).
    """
    z = _value_logits(logits, digit_token_ids)
    if z.shape[-1] != 10 or z.ndim < 2:
        raise ValueError(f"need [..., L, 10] digit logits (or the 10 digit token ids), got {tuple(z.shape)}")
    digits = torch.arange(10, dtype=z.dtype, device=z.device)
    per_digit = _expectation(z, digits, _check_temperature(temperature), False)
    length = z.shape[-2]
    places = 10.0 ** torch.arange(length - 1, -1, -1, dtype=z.dtype, device=z.device)
    return (per_digit * places).sum(-1)


# ------------------------------------------------------------------- box losses


def _gather_value_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: BoxTargets
) -> torch.Tensor:
    """``[K, n_values]`` logits of the value tokens at the coordinate positions only."""
    hidden, weight = check_tensor("hidden", hidden), check_tensor("weight", weight)
    _check_targets(targets, hidden.shape[:-1], "hidden")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, D] with D = {hidden.shape[-1]}, got {tuple(weight.shape)}")
    ids = torch.tensor(targets.tokens.value_ids, dtype=torch.long, device=weight.device)
    if int(ids.max()) >= weight.shape[0]:
        raise ValueError(f"token id {int(ids.max())} is outside the vocabulary of weight ({weight.shape[0]} rows)")
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # Only K rows of hidden and n_values rows of weight are upcast and multiplied.
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, targets.positions.to(hidden.device)).to(dtype)
    z = rows @ weight.index_select(0, ids).to(dtype).T
    if bias is not None:
        z = z + check_tensor("bias", bias).index_select(0, ids).to(dtype)
    return z


def _check_targets(targets: object, leading: torch.Size, name: str) -> None:
    if not isinstance(targets, BoxTargets):
        raise TypeError(f"targets must be a BoxTargets (see find_box_targets), got {type(targets).__name__}")
    rows = math.prod(leading)
    expected = targets.shape[0] * targets.shape[1]
    if rows != expected:
        raise ValueError(
            f"{name} has {rows} positions ({tuple(leading)}) but the box targets were found in a "
            f"{targets.shape} batch ({expected} positions)"
        )


def _pred_boxes(z: torch.Tensor, targets: BoxTargets, temperature: float, straight_through: bool) -> torch.Tensor:
    """``[M, 4]`` expected boxes (normalized) from the ``[K, n_values]`` value logits."""
    tokens = targets.tokens
    temperature = _check_temperature(temperature)
    check_bool("straight_through", straight_through)
    n = z.shape[-1]
    if tokens.kind == "bins":
        contrib = _expectation(z, (torch.arange(n, dtype=z.dtype, device=z.device) + 0.5) / n, temperature,
                               straight_through)
    else:
        digits = torch.arange(10, dtype=z.dtype, device=z.device)
        divisor = tokens.grid_size if targets.divisor is None else targets.divisor.to(z)
        scale = 10.0 ** targets.place.to(z) / divisor
        contrib = _expectation(z, digits, temperature, straight_through) * scale
    slots = targets.box_index.to(z.device) * 4 + targets.coord_index.to(z.device)
    # index_add sums the digits of a number into its coordinate (and is a copy for bins).
    return z.new_zeros(targets.num_boxes * 4).index_add(0, slots, contrib).view(-1, 4)


def _box_terms(
    z: torch.Tensor,
    targets: BoxTargets,
    *,
    l1_weight: float,
    giou_weight: float,
    temperature: float,
    straight_through: bool,
    num_boxes: int | float | torch.Tensor | None,
    eps: float,
) -> dict[str, torch.Tensor]:
    pred = _pred_boxes(z, targets, temperature, straight_through)
    target = targets.target_boxes.to(device=z.device, dtype=z.dtype)
    l1 = l1_box_loss(pred, target, num_boxes=num_boxes)
    g = giou_loss(pred, target, num_boxes=num_boxes, eps=eps)
    return {"loss": float(l1_weight) * l1 + float(giou_weight) * g, "l1": l1, "giou": g}


def box_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: BoxTargets,
    *,
    bias: torch.Tensor | None = None,
    l1_weight: float = 1.0,
    giou_weight: float = 1.0,
    temperature: float = 1.0,
    straight_through: bool = False,
    num_boxes: int | float | torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> dict[str, torch.Tensor]:
    """L1 and GIoU losses of the expected boxes, from hidden states without full logits.

    Only the ``K`` coordinate rows of ``hidden`` and the digit or bin rows of
    ``weight`` enter a ``[K, D] @ [D, n_values]`` product; the rest of the
    vocabulary is never touched (cross-entropy, e.g.
    :func:`lmloss.linear_cross_entropy`, scores the tokens themselves).

    Args:
        hidden: ``[B, T, D]`` (or ``[B*T, D]``) final hidden states of the batch in
            which ``targets`` were found, any float dtype.
        weight: ``[V, D]`` the ``lm_head`` weight.
        targets: from :func:`find_box_targets`.
        bias: ``[V]`` optional ``lm_head`` bias.
        l1_weight, giou_weight: weights of the terms in ``"loss"``.
        temperature, straight_through: see :func:`expected_bin_coordinate` (digits:
            per digit).
        num_boxes: divisor of the means (boxes of the whole optimizer step, across
            micro-batches and ranks); default: the boxes in ``targets``.
        eps: see :func:`giou`.

    Returns:
        ``{"loss": l1_weight * l1 + giou_weight * giou, "l1": ..., "giou": ...}``,
        float32 scalars (float64 for float64 hidden): ``l1`` is the mean over boxes of
        the summed coordinate errors in normalized units, ``giou`` the mean of
        ``1 - GIoU``. With no box every term is an exact 0 attached to the graph.
    """
    z = _gather_value_logits(hidden, weight, bias, targets)
    return _box_terms(z, targets, l1_weight=l1_weight, giou_weight=giou_weight, temperature=temperature,
                      straight_through=straight_through, num_boxes=num_boxes, eps=eps)


def box_loss_from_logits(
    logits: torch.Tensor,
    targets: BoxTargets,
    *,
    l1_weight: float = 1.0,
    giou_weight: float = 1.0,
    temperature: float = 1.0,
    straight_through: bool = False,
    num_boxes: int | float | torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> dict[str, torch.Tensor]:
    """:func:`box_loss` on materialized ``[B, T, V]`` logits (same options, same result)."""
    logits = check_tensor("logits", logits)
    _check_targets(targets, logits.shape[:-1], "logits")
    rows = logits.reshape(-1, logits.shape[-1]).index_select(0, targets.positions.to(logits.device))
    z = _value_logits(rows, targets.tokens.value_ids)
    return _box_terms(z, targets, l1_weight=l1_weight, giou_weight=giou_weight, temperature=temperature,
                      straight_through=straight_through, num_boxes=num_boxes, eps=eps)


def expected_boxes(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: BoxTargets,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    straight_through: bool = False,
) -> torch.Tensor:
    """``[M, 4]`` the model's expected boxes (normalized xyxy), one per target box."""
    z = _gather_value_logits(hidden, weight, bias, targets)
    return _pred_boxes(z, targets, temperature, straight_through)


def grounding_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    targets: BoxTargets,
    *,
    bias: torch.Tensor | None = None,
    l1_weight: float = 2.0,
    giou_weight: float = 0.2,
    temperature: float = 1.0,
    straight_through: bool = False,
    num_boxes: int | float | torch.Tensor | None = None,
    **ce_options: Any,
) -> dict[str, torch.Tensor]:
    """Token cross-entropy plus the box terms: ``ce + l1_weight * l1 + giou_weight * giou``.

    The default weights are NExT-Chat's (CE + 2 L1 + 0.2 (1 - GIoU)).

    Args:
        hidden: ``[B, T, D]`` final hidden states.
        weight: ``[V, D]`` ``lm_head`` weight.
        labels: ``[B, T]`` labels (the ones ``targets`` were found in).
        targets: from :func:`find_box_targets` on these labels.
        bias, l1_weight, giou_weight, temperature, straight_through, num_boxes: as in
            :func:`box_loss`.
        **ce_options: passed to :func:`lmloss.linear_cross_entropy` (e.g.
            ``num_items_in_batch``, ``ignore_index``, ``backend``); ``shift`` must
            agree with the targets.

    Returns:
        ``{"loss", "ce", "l1", "giou"}`` float32 scalars, for the backward pass and
        for logging.
    """
    from lmloss.fused import linear_cross_entropy

    shift = ce_options.pop("shift", targets.shift if isinstance(targets, BoxTargets) else True)
    _check_targets(targets, labels.shape, "labels")
    if shift != targets.shift:
        raise ValueError(f"shift={shift} but the box targets were found with shift={targets.shift}")
    ce = linear_cross_entropy(hidden, weight, labels, bias=bias, shift=shift, **ce_options)
    terms = box_loss(hidden, weight, targets, bias=bias, l1_weight=l1_weight, giou_weight=giou_weight,
                     temperature=temperature, straight_through=straight_through, num_boxes=num_boxes)
    return {"loss": ce + terms["loss"], "ce": ce, "l1": terms["l1"], "giou": terms["giou"]}
