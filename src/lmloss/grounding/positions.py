"""Positions: where in a tokenized batch the next-token targets are box coordinates.

:func:`find_box_targets` finds them (digit tokens inside ``<|box_start|>...<|box_end|>``,
the digit tokens of the pixel integers of a Qwen2.5-VL ``"bbox_2d": [...]`` list,
or bin tokens), with the same shift as :func:`lmloss.causal_lm_loss`, and returns
them as :class:`BoxTargets` for the box losses.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch

from lmloss._validation import check_bool, check_choice, check_tensor
from lmloss.grounding._common import (
    box_problem,
    check_image_size,
)
from lmloss.grounding.box_tokens import BoxTokenIds

__all__ = ["BoxTargets", "BoxTokenIds", "find_box_targets"]


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
    return [check_image_size(size, required=True) for size in sizes]


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
            problem = (
                f"token id {ids[col]} in column {col} holds several characters with a digit; "
                "the expected-number loss needs one digit per token"
            )
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
    token_text = cast(Callable[[int], str], tokens.token_text)  # json: BoxTokenIds checked it is callable
    pieces = ["\0" if i == ignore_index else token_text(i) for i in ids]
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
        yield _json_span(
            text[key.end() + 1 : close], key.end() + 1, start, owner[close] + 1, pieces, owner, ids, digits
        )


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
        problem = (
            f"coordinate {bad[0]!r} is not a non-negative integer written in digits"
            if bad
            else f'expected 4 coordinates in "bbox_2d" [x1, y1, x2, y2], found {len(items)}'
        )
        return _Span(start, end, [], problem)
    numbers: list[list[int]] = []
    for k in range(1, 5):
        columns = [owner[at + c] for c in range(match.start(k), match.end(k))]
        for col in columns:
            # The number's digits must be the digit tokens: a token such as " 5" or
            # "12" cannot be scored digit by digit.
            if ids[col] not in digits:
                problem = (
                    f"token id {ids[col]} in column {col} is {pieces[col]!r}, not one digit token; "
                    "the expected-number loss needs one digit per token"
                )
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
        problem = box_problem(raw, upper, where)
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
        # float() of the digit string: int() refuses more than 4,300 digits (such a number
        # is out of range anyway, and reported as such).
        box = [float("".join(map(str, coord))) for coord in values]
        if self.tokens.kind == "json":
            width, height = self.sizes[b]  # type: ignore[index]  # json: sizes is set
            return box, (width, height), f"a {width:g}x{height:g} image"
        grid = self.tokens.grid_size
        return box, (grid, grid), f"the 0-{grid} grid"

    def _divisors(self, b: int) -> tuple[float, float, float, float]:
        """What each of x1, y1, x2, y2 is divided by to land in [0, 1] (digits and json)."""
        if self.tokens.kind == "json":
            width, height = self.sizes[b]  # type: ignore[index]  # json: sizes is set
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
        return BoxTargets(
            longs(c["pos"]),
            longs(c["box"]),
            longs(c["coord"]),
            longs(c["value"]),
            longs(c["place"]),
            boxes,
            longs(self.rows),
            self.tokens,
            shape,
            self.shift,
            divisor,
        )
