"""The encoded sample (:class:`Example`) and how labels are made from per-token trained flags."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from lmloss.labels.options import CommonOptions

__all__ = ["Example", "finish_example", "num_targets"]


class Example(TypedDict):
    """One encoded sample: ``input_ids`` and unshifted ``labels``, both of length ``T``.

    ``labels[t]`` is ``input_ids[t]`` where token ``t`` is a target and
    ``ignore_index`` elsewhere. There is no ``attention_mask``: collators make it.
    """

    input_ids: list[int]
    labels: list[int]


def num_targets(labels: Sequence[int], ignore_index: int) -> int:
    """Targets the shifted loss can score: position 0 never is one."""
    return sum(1 for label in labels[1:] if label != ignore_index)


def finish_example(ids: Sequence[int], trained: Sequence[bool], options: CommonOptions) -> Example:
    """Labels from a per-token trained flag, placeholder masking, then truncation."""
    if options.ignore_index >= 0 and any(
        keep and t == options.ignore_index for t, keep in zip(ids, trained, strict=True)
    ):
        raise ValueError(
            f"ignore_index={options.ignore_index} is the id of a token that should be trained; "
            f"use a negative ignore_index such as -100"
        )
    labels = [
        token if keep and token not in options.ignore_token_ids else options.ignore_index
        for token, keep in zip(ids, trained, strict=True)
    ]
    ids = list(ids)
    if options.max_length is not None and len(ids) > options.max_length:
        # Right truncation keeps the beginning (system prompt, question), left keeps
        # the end (the latest turns). Either may cut every target: encode_dataset
        # reports such samples instead of letting them train as a silent zero.
        keep = (
            slice(None, options.max_length) if options.truncation_side == "right" else slice(-options.max_length, None)
        )
        ids, labels = ids[keep], labels[keep]
    return Example(input_ids=ids, labels=labels)
