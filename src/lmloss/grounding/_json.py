"""Qwen2.5-VL boxes: the ``"bbox_2d"`` objects of the JSON values written in a text.

The text is model output or a training answer: prose, maybe a markdown fence, and
JSON values. Each ``[`` or ``{`` may start one; the scan decodes it with its own
small JSON reader, because :mod:`json` recurses (a value nested 1,000 deep raises
``RecursionError``), reads Unicode digits as numbers (``[١٢]`` is 12), refuses
integers of more than 4,300 digits with a bare ``ValueError``, and keeps only the
last of two equal keys. The reader here keeps an explicit stack bounded by
:data:`JSON_MAX_DEPTH`, reads ASCII digits only, and records every object holding a
``"bbox_2d"`` key with its offset and any repeated key.

Linear time: decoding a value is context free, so the result of every container
met while decoding (a nested value, or one still open where decoding failed) is
remembered by its offset, and trying that bracket again later costs nothing. Only
brackets that were inside strings start a new decoding.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass

# json's own string reader (in C), a module attribute since Python 2.6 that typeshed omits.
from json.decoder import scanstring  # type: ignore[attr-defined]  # typeshed omits it
from typing import Any

from lmloss.grounding._common import Box, GroundedPhrase, IssueList, box_problem

__all__ = ["JSON_MAX_DEPTH", "BoxObject", "ScanResult", "parse_qwen25_vl", "scan_json"]

JSON_MAX_DEPTH = 100  # Qwen2.5-VL answers nest 2 levels deep; deeper is not box text

_WS = re.compile(r"[ \t\n\r]*")
# One token (after JSON whitespace); numbers in ASCII digits only (json's own reader
# uses \d, which matches any Unicode digit).
_TOKEN = re.compile(
    r"[ \t\n\r]*(?:(?P<open>[\[{])|(?P<close>[\]}])|(?P<comma>,)|(?P<colon>:)|(?P<string>\")"
    r"|(?P<number>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)|(?P<literal>true|false|null))"
)
_OPEN = re.compile(r"[\[{]")
_BBOX_KEY = re.compile(r'"bbox_2d"\s*:')
_LITERALS = {"true": True, "false": False, "null": None}
_BOX_KEYS = ("bbox_2d", "label")
# What the reader expects next.
_VALUE, _FIRST_VALUE, _KEY, _FIRST_KEY, _COLON, _AFTER = range(6)


@dataclass
class BoxObject:
    """A JSON object with a ``"bbox_2d"`` key, at ``text[start:end]``.

    ``duplicate`` names a ``"bbox_2d"`` or ``"label"`` key written twice and where
    (JSON keeps the last one, so the first would be lost silently).
    """

    start: int
    end: int = -1
    bbox: Any = None
    label: Any = None
    duplicate: tuple[str, int] | None = None


@dataclass(frozen=True)
class ScanResult:
    """What decoding from one opening bracket gave.

    ``end`` is where the value ends (None when it failed at ``pos`` with
    ``error``, ``too_deep`` when nested beyond :data:`JSON_MAX_DEPTH`);
    ``entries`` its objects with a ``"bbox_2d"`` key, in key order.
    """

    end: int | None
    entries: tuple[BoxObject, ...] = ()
    error: str = ""
    pos: int = 0
    too_deep: bool = False


class _Frame:
    """An open container: its value so far and, for objects, the key being read."""

    __slots__ = ("duplicate", "entry", "first", "key", "start", "value")

    def __init__(self, start: int, is_object: bool, first: int) -> None:
        self.start = start
        self.value: dict[str, Any] | list[Any] = {} if is_object else []
        self.key: str | None = None
        self.duplicate: tuple[str, int] | None = None
        self.entry: BoxObject | None = None
        self.first = first  # the entries of this value start at this index of the reader's list


class _Reader:
    """One decoding attempt from an opening bracket, with an explicit stack."""

    def __init__(self, text: str, start: int, memo: dict[int, ScanResult]) -> None:
        self.text, self.start, self.memo = text, start, memo
        self.stack: list[_Frame] = []
        self.entries: list[BoxObject] = []

    def fail(self, pos: int, error: str, *, too_deep: bool = False) -> ScanResult:
        # Each open container, tried on its own, would fail here the same way.
        result = ScanResult(None, (), error, pos, too_deep)
        for frame in self.stack:
            self.memo[frame.start] = result
        return result

    def run(self) -> ScanResult:
        text, stack = self.text, self.stack
        i, state = self.start, _VALUE
        while True:
            token = _TOKEN.match(text, i)
            if token is None:
                at = _WS.match(text, i).end()  # type: ignore[union-attr]  # [...]* always matches
                return self.fail(at, self.unexpected(at, state))
            kind = str(token.lastgroup)  # one named group always matches
            at, i = token.start(kind), token.end()
            if state == _AFTER:
                in_object = isinstance(stack[-1].value, dict)
                if kind == "comma":
                    state = _KEY if in_object else _VALUE
                elif kind == "close" and text[at] == ("}" if in_object else "]"):
                    if self.close(at):
                        return self.memo[self.start]
                else:
                    return self.fail(at, self.unexpected(at, state))
            elif state == _COLON:
                if kind != "colon":
                    return self.fail(at, self.unexpected(at, state))
                state = _VALUE
            elif state != _VALUE and state != _FIRST_VALUE:  # a key, or an object's end
                if kind == "string":
                    try:
                        key, i = scanstring(text, i)
                    except json.JSONDecodeError as error:
                        return self.fail(error.pos, error.msg)
                    self.set_key(key, at)
                    state = _COLON
                elif kind == "close" and text[at] == "}" and state == _FIRST_KEY:
                    if self.close(at):
                        return self.memo[self.start]
                    state = _AFTER
                else:
                    return self.fail(at, self.unexpected(at, state))
            elif kind == "open":
                if len(stack) >= JSON_MAX_DEPTH:
                    return self.fail(at, f"nested deeper than {JSON_MAX_DEPTH} levels", too_deep=True)
                is_object = text[at] == "{"
                stack.append(_Frame(at, is_object, len(self.entries)))
                state = _FIRST_KEY if is_object else _FIRST_VALUE
            elif kind == "close" and text[at] == "]" and state == _FIRST_VALUE:
                if self.close(at):
                    return self.memo[self.start]
                state = _AFTER
            elif kind == "string":
                try:
                    value, i = scanstring(text, i)
                except json.JSONDecodeError as error:
                    return self.fail(error.pos, error.msg)
                self.put(value)
                state = _AFTER
            elif kind == "number":
                number = token.group(kind)
                # int() refuses more than 4,300 digits; such a number is out of any range anyway.
                exact = len(number) <= 300 and "." not in number and "e" not in number and "E" not in number
                self.put(int(number) if exact else float(number))
                state = _AFTER
            elif kind == "literal":
                self.put(_LITERALS[token.group(kind)])
                state = _AFTER
            else:
                return self.fail(at, self.unexpected(at, state))

    def unexpected(self, at: int, state: int) -> str:
        """What was expected where ``text[at]`` (or the end of the text) stands."""
        if at >= len(self.text):
            return "the text ends inside the JSON value"
        if state in (_VALUE, _FIRST_VALUE) and self.text[at].isdigit():
            return f"non-ASCII digit {self.text[at]!r} (only 0-9 write numbers)"
        if state == _AFTER:
            return f"expected ',' or '{'}' if isinstance(self.stack[-1].value, dict) else ']'}'"
        if state == _COLON:
            return "expected ':' after the key"
        return "expected a value" if state in (_VALUE, _FIRST_VALUE) else "expected a string key"

    def set_key(self, key: str, at: int) -> None:
        frame = self.stack[-1]
        if key in _BOX_KEYS and key in frame.value and frame.duplicate is None:
            frame.duplicate = (key, at)
        if key == "bbox_2d" and frame.entry is None:
            frame.entry = BoxObject(frame.start)
            self.entries.append(frame.entry)  # in the text order of the keys
        frame.key = key

    def put(self, value: Any) -> None:
        frame = self.stack[-1]
        if isinstance(frame.value, list):
            frame.value.append(value)
        else:
            frame.value[frame.key] = value  # type: ignore[index]  # an object: set_key set key

    def close(self, i: int) -> bool:
        """Close the innermost container at ``text[i]``; True when it was the outermost."""
        frame = self.stack.pop()
        end = i + 1
        entry, value = frame.entry, frame.value
        if entry is not None and isinstance(value, dict):  # only objects hold entries
            entry.end, entry.duplicate = end, frame.duplicate
            entry.bbox, entry.label = value["bbox_2d"], value.get("label")
        # The keys of a value are read while it is open: its entries are one slice.
        result = ScanResult(end, tuple(self.entries[frame.first :]))
        self.memo[frame.start] = result
        if not self.stack:
            return True
        self.put(frame.value)
        return False


def scan_json(text: str, start: int, memo: dict[int, ScanResult]) -> ScanResult:
    """Decode the JSON container that opens at ``text[start]`` (a ``[`` or ``{``).

    ``memo`` (one per text) holds the result of every container already met.
    """
    known = memo.get(start)
    return known if known is not None else _Reader(text, start, memo).run()


def parse_qwen25_vl(text: str, issues: IssueList, image_size: tuple[int, int] | None) -> list[GroundedPhrase]:
    """Every ``"bbox_2d"`` object of the JSON values in ``text``; report keys in undecodable JSON.

    Each ``[`` or ``{`` is tried as the start of a JSON value; prose brackets simply
    fail to decode and are skipped. A ``"bbox_2d"`` key that no decoded value covers
    (truncated or broken JSON) is reported, so nothing is lost silently; so is a
    value nested deeper than :data:`JSON_MAX_DEPTH`.
    """
    groups: list[GroundedPhrase] = []
    covered: list[tuple[int, int]] = []  # decoded spans, sorted and disjoint
    failures: list[tuple[int, str, bool]] = []  # (start, reason, already reported), sorted by start
    memo: dict[int, ScanResult] = {}
    deep_from, deep_to = -1, -1  # brackets of one too-deep value (and its retries): reported once
    i = 0
    while (opening := _OPEN.search(text, i)) is not None:
        start = opening.start()
        result = scan_json(text, start, memo)
        if result.end is not None:
            covered.append((start, result.end))
            groups.extend(_box_groups(result.entries, issues, image_size))
            i = result.end
            continue
        if result.too_deep:
            if not deep_from <= start <= deep_to:
                deep_from = start
                problem = f"JSON nested deeper than {JSON_MAX_DEPTH} levels (position {result.pos})"
                issues.add(start, result.pos, problem)
            deep_to = result.pos
        failures.append((start, f"{result.error}, position {result.pos}", result.too_deep))
        i = start + 1
    _report_uncovered(text, covered, failures, issues)
    return groups


def _box_groups(
    entries: tuple[BoxObject, ...], issues: IssueList, image_size: tuple[int, int] | None
) -> list[GroundedPhrase]:
    groups = []
    for entry in entries:
        if entry.duplicate is not None:
            key, at = entry.duplicate
            problem: str | None = f'the key "{key}" is written twice (again at character {at}); one box per object'
            box = None
        else:
            box, problem = _json_box(entry.bbox, entry.label, image_size)
        if problem is not None:
            issues.add(entry.start, entry.end, problem)
            continue
        groups.append(GroundedPhrase(entry.label, (box,), entry.start))  # type: ignore[arg-type]  # no problem: a box
    return groups


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_box(bbox: Any, label: Any, image_size: tuple[int, int] | None) -> tuple[Box | None, str | None]:
    if label is not None and not isinstance(label, str):
        return None, f'"label" must be a string, got {_short(label)}'
    if not isinstance(bbox, list):
        return None, f'"bbox_2d" must be a list [x1, y1, x2, y2], got {_short(bbox)}'
    bad = [v for v in bbox if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad:
        return None, f"non-numeric coordinate {_short(bad[0])}"
    if len(bbox) != 4:
        return None, f'expected 4 coordinates in "bbox_2d" [x1, y1, x2, y2], found {len(bbox)}'
    values = tuple(float(v) for v in bbox)
    problem = box_problem(values, image_size, "pixels" if image_size is None else f"a {image_size} image")
    return (None, problem) if problem else (values, None)  # type: ignore[return-value]  # 4 entries (checked)


def _report_uncovered(
    text: str, covered: list[tuple[int, int]], failures: list[tuple[int, str, bool]], issues: IssueList
) -> None:
    """Report each ``"bbox_2d"`` key outside every decoded value (one pass, keys in order).

    Blame the outermost failed value that starts after the last decoded one (and
    before the key); a key in no JSON value at all is reported where it stands.
    """
    starts = [at for at, _, _ in failures]
    k, last_good = 0, 0
    for key in (m.start() for m in _BBOX_KEY.finditer(text)):
        while k < len(covered) and covered[k][1] <= key:
            last_good, k = covered[k][1], k + 1
        if k < len(covered) and covered[k][0] <= key:
            continue  # inside a decoded value (a key, or text in one of its strings)
        j = bisect.bisect_left(starts, last_good)
        if j < len(starts) and starts[j] <= key:
            at, reason, reported = failures[j]
            if not reported:
                issues.add(at, key + 40, f'"bbox_2d" in invalid JSON ({reason})')
        else:
            issues.add(key, key + 40, '"bbox_2d" in invalid JSON')
