"""Tokenizing text: character spans to trained tokens, and the window a long text is tokenized in.

With ``max_length`` only a window of a long text on the kept side is tokenized
(:mod:`lmloss._text_window`), so truncation costs memory in proportion to
``max_length`` instead of to the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmloss._text_window import enough_tokens, max_token_chars, text_windows
from lmloss.labels.options import CommonOptions

__all__ = ["window_ids", "window_tokens"]


def window_tokens(
    tokenizer: Any, text: str, spans: list[tuple[int, int]] | None, options: CommonOptions
) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and whether each is trained (``spans=None``: every token).

    With ``max_length``, only a window of the text on the kept side is tokenized
    (:mod:`lmloss._text_window`): the kept tokens and their flags are those of the
    whole text, and memory stays bounded by ``max_length`` instead of the text.
    """
    m = options.max_length
    chars = max_token_chars(tokenizer) if m is not None else None
    windows = [(text, 0)] if m is None or chars is None else text_windows(text, m, options.truncation_side, chars)
    for piece, start in windows:
        if spans is None:
            ids = _encode_text(tokenizer, piece)[0]
            trained = [True] * len(ids)
        else:
            ids, trained = _tokens_in_spans(tokenizer, piece, _spans_in_window(spans, start, len(piece)))
        if len(piece) == len(text) or (m is not None and enough_tokens(len(ids), m)):  # m is None: one whole window
            break
    return ids, trained


def _spans_in_window(spans: list[tuple[int, int]], start: int, length: int) -> list[tuple[int, int]]:
    """``spans`` (sorted, disjoint) in the coordinates of ``text[start:start + length]``, clipped to it."""
    clipped = [(max(a - start, 0), min(b - start, length)) for a, b in spans]
    return [(a, b) for a, b in clipped if a < b]


def window_ids(
    tokenizer: Any, value: Any, need: int | None, side: str, leading_specials: bool = False
) -> tuple[list[int], bool]:
    """The ids of ``value`` (text or ids), and whether they are all of them.

    With ``need``, at least the ``need`` ids at the kept end (the start for
    ``side="right"``, the end for ``"left"``) are those of the whole text; the rest
    may be missing. Leading special tokens are included unless a left window cut them.
    """
    if not isinstance(value, str):
        return list(value), True
    if need is not None and need <= 0:
        return [], False  # nothing of this text survives truncation
    specials = _leading_special_ids(tokenizer) if leading_specials else []
    chars = max_token_chars(tokenizer) if need is not None else None
    windows = [(value, 0)] if need is None or chars is None else text_windows(value, need, side, chars)
    for piece, _ in windows:
        ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
        whole = len(piece) == len(value)
        if whole or (need is not None and enough_tokens(len(ids), need)):  # need is None: one whole window
            break
    return (specials + ids if whole or side == "right" else ids), whole


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS), found by probing.

    Trailing ones (an EOS or SEP that some tokenizers add) are left out on purpose:
    they would sit between the prompt and the completion.
    """
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if full and full[0] == bos else []


def _encode_text(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids of rendered chat text (no special tokens added, as apply_chat_template)
    and each token's character range, or ``None`` if the tokenizer has no offsets."""
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow (Python) tokenizers of older transformers
        encoding = tokenizer(text, add_special_tokens=False)
    offsets = encoding.get("offset_mapping")  # Python tokenizers may silently omit it
    return list(encoding["input_ids"]), None if offsets is None else [tuple(o) for o in offsets]


def _tokens_in_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and whether each token overlaps a span of ``spans``."""
    ids, offsets = _encode_text(tokenizer, text)
    if offsets is None:
        return ids, _mask_by_prefixes(tokenizer, text, ids, spans)
    return ids, _mask_by_offsets(offsets, spans)


def _mask_by_offsets(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """A token is trained if its character range overlaps a span.

    Overlap, not containment: a BPE token that merges the end of the template with
    the start of the content (``" Sure"`` after ``"Assistant: "``, ``"\\n\\n"`` after
    ``"assistant\\n"``) carries content, so it is a target. Zero-width tokens count
    as inside a span when their position is. Both offsets and (disjoint, sorted)
    spans increase, so one sweep suffices.
    """
    mask, j = [], 0
    for start, end in offsets:
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j == len(spans):
            mask.append(False)
            continue
        a, b = spans[j]
        mask.append(a <= start < b if start == end else (start < b and end > a))
    return mask


def _mask_by_prefixes(tokenizer: Any, text: str, ids: list[int], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Fallback for tokenizers without offsets: tokenize ``text[:c]`` at each span
    boundary ``c`` and compare with the full token sequence.

    If the prefix's tokens are a prefix of the full tokens, the boundary falls
    between tokens. Otherwise the first differing token straddles the boundary
    (BPE merged across it) and, as with offsets, it counts as overlapping the span.
    """
    mask = [False] * len(ids)
    for a, b in spans:
        first = _boundary_token(tokenizer, text, ids, a, is_end=False)
        stop = _boundary_token(tokenizer, text, ids, b, is_end=True)
        for k in range(first, min(stop, len(ids))):
            mask[k] = True
    return mask


def _boundary_token(tokenizer: Any, text: str, ids: list[int], c: int, *, is_end: bool) -> int:
    prefix = list(tokenizer(text[:c], add_special_tokens=False)["input_ids"]) if c else []
    common = 0
    while common < min(len(prefix), len(ids)) and prefix[common] == ids[common]:
        common += 1
    if common == len(prefix):
        return common  # the boundary falls between tokens
    return common + 1 if is_end else common  # token `common` straddles it: it is trained
