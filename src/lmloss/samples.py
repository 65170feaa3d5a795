"""The sample formats of a data file, and the checks of pre-tokenized samples.

A sample is a JSON object in one of three formats::

    {"messages": [{"role": "user", "content": "..."}, ...]}   # a conversation
    {"prompt": "...", "completion": "..."}                      # a pair
    {"input_ids": [...], "labels": [...]}                       # pre-tokenized

Conversations and pairs are labelled by :mod:`lmloss.labels`, which can only produce
ids of its tokenizer. Pre-tokenized samples come from elsewhere, so
:func:`pretokenized_example` checks them: ``lmloss train`` and ``lmloss check`` call
the same function, so ``check`` refuses exactly what ``train`` would.
"""

from __future__ import annotations

from typing import Any

from lmloss.labels import Example

__all__ = ["pretokenized_example", "sample_error"]


def sample_error(data: Any) -> str | None:
    """Why a decoded line is not a sample, or ``None`` if it is one.

    A sample is a JSON object with ``messages``, or ``prompt`` and ``completion``,
    or ``input_ids`` and ``labels``.
    """
    if not isinstance(data, dict):
        return f"expected a JSON object per line, got {type(data).__name__}"
    if "messages" in data or {"prompt", "completion"} <= data.keys() or {"input_ids", "labels"} <= data.keys():
        return None
    return (
        f"a sample needs 'messages', or 'prompt' and 'completion', or 'input_ids' and 'labels'; "
        f"it has keys {sorted(data)}"
    )


def pretokenized_example(input_ids: object, labels: object, *, vocab_size: int, ignore_index: int = -100) -> Example:
    """A pre-tokenized sample as an :class:`~lmloss.labels.Example`, after checking it.

    Args:
        input_ids: a list of ints, each in ``[0, vocab_size)``.
        labels: a list of ints of the same length, each in ``[0, vocab_size)`` or
            ``ignore_index`` (unshifted, as :mod:`lmloss.labels` makes them).
        vocab_size: the number of token ids (``len(tokenizer)``).
        ignore_index: the label of untrained tokens.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` (new lists of Python ints).

    Raises:
        ValueError: naming the field and position of the first bad value: not an
            int (floats such as ``1.9`` and booleans are refused, never rounded), or
            outside the vocabulary; lengths that differ; an empty sample.
    """
    ids = _int_list("input_ids", input_ids, vocab_size, None)
    labs = _int_list("labels", labels, vocab_size, ignore_index)
    if len(ids) != len(labs):
        raise ValueError(f"'input_ids' has {len(ids)} tokens but 'labels' has {len(labs)}; they must match")
    if not ids:
        raise ValueError("'input_ids' is empty")
    return Example(input_ids=ids, labels=labs)


def _int_list(name: str, value: object, vocab_size: int, ignore_index: int | None) -> list[int]:
    # ValueError, not TypeError, for wrong types too: it is the data that is bad, and
    # callers report every bad sample the same way.
    if not isinstance(value, list):
        raise ValueError(f"'{name}' must be a list of ints, got {type(value).__name__}")
    allowed = f"[0, {vocab_size})" + ("" if ignore_index is None else f" or {ignore_index}")
    for position, item in enumerate(value):
        # bool is an int subclass: true/false in a JSON list is a mistake, not the ids 1/0.
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(f"'{name}'[{position}] = {_short(item)} is not an integer token id (expected {allowed})")
        if not (0 <= item < vocab_size or item == ignore_index):
            raise ValueError(f"'{name}'[{position}] = {_short(item)} is outside the vocabulary (expected {allowed})")
    return [int(item) for item in value]


def _short(value: object, width: int = 40) -> str:
    # repr of an int over 4,300 digits raises (CPython's int/str conversion limit).
    text = (
        repr(value)
        if not isinstance(value, int) or value.bit_length() < 128
        else f"an int of {value.bit_length()} bits"
    )
    return text if len(text) <= width else text[: width - 3] + "..."
