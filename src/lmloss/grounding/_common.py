"""What every part of :mod:`lmloss.grounding` shares: box types, text markers, issues, checks.

Private to the package (the names are public so the package's modules import them
by public names); users get these through :mod:`lmloss.grounding`.
"""

from __future__ import annotations

import math
import numbers
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, overload

from lmloss._validation import check_choice

__all__ = [
    "BOX_END",
    "BOX_START",
    "DEFAULT_BIN_PATTERN",
    "FORMATS",
    "QWEN2_VL_GRID",
    "REF_END",
    "REF_START",
    "SNIPPET",
    "SPACES",
    "Box",
    "BoxFormatError",
    "BoxIssue",
    "Format",
    "GroundedPhrase",
    "GroundingParse",
    "IssueList",
    "Reduction",
    "Space",
    "bin_affixes",
    "box_problem",
    "check_image_size",
    "check_num_bins",
    "check_order",
    "digits_problem",
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
SNIPPET = 80  # how much of a malformed piece of text an issue quotes


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


class IssueList:
    """Collects malformed spans of one text (the caller decides to raise or report)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.items: list[BoxIssue] = []

    def add(self, start: int, end: int, problem: str) -> None:
        snippet = self.text[start : min(max(end, start + 1), start + SNIPPET)]
        self.items.append(BoxIssue(start, snippet, problem))


_ASCII_DIGITS = re.compile(r"[0-9]+")


def digits_problem(text: str, what: str) -> str | None:
    """Why ``text`` is not a number written in ASCII digits 0-9, or None.

    ``float()`` and ``str.isdecimal()`` accept any Unicode digit ('١٢', '１'), which no
    tokenizer's digit tokens write: such text is reported, never read as a number.
    """
    if _ASCII_DIGITS.fullmatch(text):
        return None
    if any(char.isdigit() and not char.isascii() for char in text):
        return f"{what} {text[:20]!r} has non-ASCII digits (only 0-9 write numbers)"
    return f"non-numeric {what} {text[:20]!r}"


def box_problem(values: Sequence[float], upper: tuple[float, float] | None, where: str) -> str | None:
    """Why ``values`` (x1, y1, x2, y2) is not a valid box, or None."""
    for axis, value in zip("xyxy", values):
        limit = None if upper is None else upper[0 if axis == "x" else 1]
        if not math.isfinite(value):
            return f"coordinate {value:g} is not a finite number ({where})"
        if value < 0 or (limit is not None and value > limit):
            allowed = "[0, inf)" if limit is None else f"[0, {limit:g}]"
            return f"coordinate {value:g} is outside {allowed} ({where})"
    if values[2] < values[0]:
        return f"x2 = {values[2]:g} < x1 = {values[0]:g} (boxes are written top-left corner first)"
    if values[3] < values[1]:
        return f"y2 = {values[3]:g} < y1 = {values[1]:g} (boxes are written top-left corner first)"
    return None


def bin_affixes(pattern: object) -> tuple[str, str]:
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


def check_num_bins(num_bins: object) -> int:
    if num_bins is None:
        raise ValueError("the bins format needs num_bins (the number of location tokens)")
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
    return num_bins


def check_order(order: object) -> Literal["xyxy", "yxyx"]:
    check_choice("order", order, ("xyxy", "yxyx"))
    return "xyxy" if order == "xyxy" else "yxyx"  # the same string, typed as the Literal


@overload
def check_image_size(image_size: object, *, required: Literal[True]) -> tuple[int, int]: ...
@overload
def check_image_size(image_size: object, *, required: bool) -> tuple[int, int] | None: ...
def check_image_size(image_size: object, *, required: bool) -> tuple[int, int] | None:
    if image_size is None:
        if required:
            raise ValueError("pixel coordinates need image_size=(width, height)")
        return None
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2 or not all(map(_positive, image_size)):
        raise ValueError(f"image_size must be (width, height) with positive sizes, got {image_size!r}")
    return (image_size[0], image_size[1])


def _positive(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    # Compared as given (no float(): a huge int stays exact).
    return value > 0  # type: ignore[operator]  # typeshed's numbers.Real declares < and <= only
