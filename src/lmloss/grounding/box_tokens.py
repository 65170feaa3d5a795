"""Which token ids carry box coordinates: ``BoxTokenIds`` for each text format
(Qwen2-VL digits between box markers, Qwen2.5-VL JSON digits, bin tokens), built by hand
or from a tokenizer. ``positions.py`` finds the coordinates in tokenized batches with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lmloss._validation import check_choice
from lmloss.grounding._common import (
    BOX_END,
    BOX_START,
    DEFAULT_BIN_PATTERN,
    FORMATS,
    QWEN2_VL_GRID,
    Format,
    bin_affixes,
    check_num_bins,
    check_order,
)

__all__ = ["BoxTokenIds"]


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
        check_order(self.order)
        ids = tuple(self.value_ids)
        if len(set(ids)) != len(ids) or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(f"value_ids must be distinct non-negative token ids, got {ids!r}")
        if self.kind in ("digits", "json") and len(ids) != 10:
            raise ValueError(f"{self.kind} needs the 10 token ids of '0'..'9', got {len(ids)}")
        if self.kind == "json":
            if not callable(self.token_text):
                raise ValueError('json needs token_text (token id -> its text) to find the "bbox_2d" keys')
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
        return cls(
            "digits",
            tuple(int(i) for i in digit_ids),
            int(box_start_id),
            int(box_end_id),
            grid_size,
            frozenset(int(i) for i in merged_digit_ids),
        )

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
            bin_affixes(pattern)
            names = [pattern.format(k) for k in range(check_num_bins(num_bins))]
            return cls.bins([_single_token_id(tokenizer, name) for name in names], order=order)
        digits = [_single_token_id(tokenizer, str(d)) for d in range(10)]
        if fmt == "qwen2.5-vl":
            return cls.json_digits(digits, _DecodedText(tokenizer))
        vocab = tokenizer.get_vocab()
        merged = [i for tok, i in vocab.items() if i not in digits and any(c in "0123456789" for c in tok)]
        return cls.digits(
            digits,
            _single_token_id(tokenizer, BOX_START),
            _single_token_id(tokenizer, BOX_END),
            merged_digit_ids=merged,
        )


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
