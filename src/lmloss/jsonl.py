"""Reading JSONL data files: one JSON object per line, each kept with its ``file:line``.

Files are read as bytes and each line is decoded on its own, so one bad byte makes
one bad line (named by its number) instead of an unreadable file. Every failure of a
line is a :class:`DataError` (a ``ValueError``) that carries the file and the line,
so a command can print it as one line, skip it, or count it.

JSON nesting is bounded (:data:`MAX_JSON_DEPTH`): Python's parser recurses once per
level, so ``[[[[...`` a few thousand levels deep raises ``RecursionError``, and
shallower but still deep values make every later recursive walk (templates,
``repr`` in messages) fragile. No sample format needs more than a handful of levels.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmloss.samples import sample_error

__all__ = [
    "MAX_JSON_DEPTH",
    "DataError",
    "NestingError",
    "Record",
    "check_json_depth",
    "empty_file_error",
    "iter_jsonl",
    "loads_bounded",
    "read_jsonl_records",
    "read_jsonl_samples",
    "scan_samples",
]

#: The deepest JSON nesting a line may have (objects and arrays, the outer object is 1).
MAX_JSON_DEPTH = 100

# A JSON string (escapes included) or one bracket: brackets inside strings are skipped.
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_OPENING = frozenset("[{")
_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A bad line (or a bad file) of a data file.

    ``str(error)`` is ``"file:line: reason"`` (``"file: reason"`` without a line).

    Attributes:
        path: the file, as given.
        line: the 1-based line number, or ``None`` for the file as a whole.
        reason: what is wrong, without the location.
    """

    def __init__(self, path: str | Path, line: int | None, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.where}: {reason}")

    @property
    def where(self) -> str:
        """``file:line`` (or ``file``)."""
        return self.path if self.line is None else f"{self.path}:{self.line}"


class NestingError(ValueError):
    """JSON text nested deeper than allowed (see :func:`check_json_depth`).

    Attributes:
        depth: the depth found (at least ``limit + 1``; the scan stops there).
        limit: the bound.
    """

    def __init__(self, depth: int, limit: int) -> None:
        self.depth = depth
        self.limit = limit
        super().__init__(f"JSON nested deeper than {limit} levels (objects/arrays inside each other)")


@dataclass(frozen=True)
class Record:
    """One sample read from a JSONL file, with where it came from.

    Attributes:
        source: the file, as given.
        line: its 1-based line number.
        data: the decoded JSON object.
    """

    source: str
    line: int
    data: dict[str, Any]

    @property
    def where(self) -> str:
        """``file:line``, for messages."""
        return f"{self.source}:{self.line}"


def check_json_depth(text: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise :class:`NestingError` if ``text`` nests objects/arrays deeper than ``limit``.

    One linear pass (a regular expression skips strings, so brackets inside them
    do not count), and none at all for text with fewer brackets than ``limit``.
    Malformed text is not judged here: the JSON parser reports it.
    """
    if text.count("[") + text.count("{") <= limit:
        return
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        token = match.group()
        if token in _OPENING:
            depth += 1
            if depth > limit:
                raise NestingError(depth, limit)
        elif token in "]}":
            depth -= 1


def loads_bounded(text: str, limit: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with the nesting bounded by ``limit``.

    Raises:
        NestingError: nested deeper than ``limit`` (never ``RecursionError``).
        json.JSONDecodeError: not valid JSON.
    """
    check_json_depth(text, limit)
    return json.loads(text)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any | DataError]]:
    """Each non-blank line's number and its JSON value, or the :class:`DataError` that describes it.

    Yielding errors instead of raising lets a caller report every bad line, skip
    them, or stop at the first. A UTF-8 byte-order mark at the start is allowed.

    Raises:
        OSError: the file cannot be opened or read.
    """
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if not raw.strip():
                continue
            yield number, _parse_line(path, number, raw)


def _parse_line(path: str | Path, number: int, raw: bytes) -> Any | DataError:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = raw[err.start : err.start + 1].hex()
        return DataError(path, number, f"not valid UTF-8 (byte 0x{bad} at byte {err.start + 1} of the line)")
    try:
        return loads_bounded(text)
    except NestingError as err:
        return DataError(path, number, str(err))
    except json.JSONDecodeError as err:
        return DataError(path, number, f"not valid JSON ({err.msg} at column {err.colno}): {_preview(text)}")
    except ValueError as err:  # e.g. an integer of more than 4,300 digits
        return DataError(path, number, f"not valid JSON ({err}): {_preview(text)}")


def _preview(text: str, width: int = 60) -> str:
    text = text.strip()
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def scan_samples(path: str | Path) -> Iterator[tuple[int, Record | DataError]]:
    """Each non-blank line's number and its :class:`Record`, or the :class:`DataError` for the line."""
    for number, value in iter_jsonl(path):
        if isinstance(value, DataError):
            yield number, value
            continue
        why = sample_error(value)
        yield number, DataError(path, number, why) if why else Record(str(path), number, value)


def read_jsonl_records(path: str | Path) -> list[Record]:
    """Read a JSONL file of samples, keeping each one's line number.

    Blank lines are skipped. A line must be a JSON object with ``messages``, or
    ``prompt`` and ``completion``, or ``input_ids`` and ``labels``.

    Raises:
        DataError: naming the file and line, for a line that is not UTF-8, not
            JSON, nested too deep, not an object, or in none of the formats; and
            naming the file, for a file without samples.
        FileNotFoundError: the file does not exist.
    """
    records: list[Record] = []
    for _, value in scan_samples(path):
        if isinstance(value, DataError):
            raise value
        records.append(value)
    if not records:
        raise empty_file_error(path)
    return records


def read_jsonl_samples(path: str | Path) -> list[dict[str, Any]]:
    """The samples of a JSONL file as plain dicts (see :func:`read_jsonl_records`)."""
    return [record.data for record in read_jsonl_records(path)]


def empty_file_error(path: str | Path) -> DataError:
    """The error for a file without any sample."""
    return DataError(path, None, "has no samples: the file is empty (or only blank lines); "
                                 "expected one JSON object per line")  # fmt: skip
