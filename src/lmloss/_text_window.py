"""Cutting long text before it is tokenized, so that truncation costs memory in
proportion to ``max_length`` instead of to the text.

A token never covers more characters of the text than its own string in the
vocabulary has (a byte-level BPE token of ``k`` bytes covers at most ``k``
characters; ``"▁the"``/``"##ing"`` cover at most their length). So the first
``n`` tokens of a text lie within its first ``n * L`` characters, where ``L`` is the
longest token string of the vocabulary, and a window of
``(max_length + SLACK_TOKENS) * L`` characters holds every token truncation keeps.

The window is accepted only if it really holds ``max_length + SLACK_TOKENS`` tokens:
tokenizers that drop or fold characters (whitespace that is no token, ``[UNK]`` for
a long word, normalizers that merge characters) cover more text per token, and then
the window doubles until it does (or is the whole text). The ``SLACK_TOKENS`` tokens
next to the cut are never kept: a cut can change how the word it falls in is
tokenized, and the slack keeps that change away from the tokens kept.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

__all__ = ["SLACK_TOKENS", "enough_tokens", "max_token_chars", "text_windows"]

#: Tokens next to a cut that are never kept (a cut may re-tokenize the word it falls in).
SLACK_TOKENS = 64

_CACHE: weakref.WeakKeyDictionary[Any, tuple[int, int]] = weakref.WeakKeyDictionary()


def max_token_chars(tokenizer: Any) -> int | None:
    """The length of the longest token string of ``tokenizer``'s vocabulary (added tokens too).

    Computed once per tokenizer (again if its vocabulary grows); ``None`` for an
    object without ``get_vocab`` (then text is never cut).
    """
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(get_vocab):
        return None
    try:
        size = len(tokenizer)
    except TypeError:
        size = -1
    try:
        cached = _CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable or not hashable: compute every time
        cached = None
    if cached is not None and cached[0] == size:
        return cached[1]
    longest = max((len(token) for token in get_vocab()), default=0)
    with contextlib.suppress(TypeError):
        _CACHE[tokenizer] = (size, max(longest, 1))
    return max(longest, 1)


def text_windows(text: str, max_length: int, side: str, chars_per_token: int) -> Iterator[tuple[str, int]]:
    """Ever larger windows of ``text`` from the kept side, the whole text last.

    Yields ``(piece, start)``: ``piece == text[start:start + len(piece)]``; with
    ``side="right"`` (truncation keeps the beginning) pieces are prefixes, with
    ``"left"`` suffixes. The caller tokenizes a piece and stops when it holds at
    least ``max_length + SLACK_TOKENS`` tokens, or at the whole text.
    """
    budget = (max_length + SLACK_TOKENS) * chars_per_token
    while budget < len(text):
        yield (text[:budget], 0) if side == "right" else (text[-budget:], len(text) - budget)
        budget *= 2
    yield text, 0


def enough_tokens(num_tokens: int, max_length: int) -> bool:
    """Whether a window with ``num_tokens`` tokens holds every kept token, away from the cut."""
    return num_tokens >= max_length + SLACK_TOKENS
