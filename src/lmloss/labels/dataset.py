"""``encode_dataset``: many samples encoded, with an account of those left with nothing to train."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmloss._validation import check_choice
from lmloss.labels.chat import encode_chat
from lmloss.labels.example import Example, num_targets
from lmloss.labels.options import (
    ChatMode,
    OnEmpty,
    TruncationSide,
    check_flag,
    common_options,
    preview,
    resolve_mode,
)
from lmloss.labels.pairs import encode_prompt_completion
from lmloss.labels.render import check_template_kwargs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DatasetReport", "EncodedDataset", "NoTargetWarning", "encode_dataset"]


_ON_EMPTY = ("warn", "drop", "error")


class NoTargetWarning(UserWarning):
    """Some samples have no target token (e.g. after truncation); see :func:`encode_dataset`."""


@dataclass(frozen=True)
class DatasetReport:
    """What :func:`encode_dataset` found.

    Attributes:
        num_samples: samples read.
        num_empty: samples with no target (nothing in ``labels[1:]`` is trained).
        empty_indices: their indices in the input, in order.
        num_dropped: samples left out of the result (``on_empty="drop"``), else 0.
        max_length: the truncation length used, or ``None``.
    """

    num_samples: int
    num_empty: int
    empty_indices: tuple[int, ...]
    num_dropped: int
    max_length: int | None


class EncodedDataset(list[Example]):
    """A ``list`` of :class:`Example` with the :class:`DatasetReport` that made it in ``.report``."""

    def __init__(self, examples: Iterable[Example], report: DatasetReport) -> None:
        super().__init__(examples)
        self.report = report


def encode_dataset(
    samples: Iterable[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    on_empty: OnEmpty = "warn",
    mode: ChatMode = "assistant",
    mask_history: bool | None = None,
    train_on_prompt: bool | None = None,
    add_eos: bool = True,
    eos_token_id: int | None = None,
    max_length: int | None = None,
    truncation_side: TruncationSide = "right",
    ignore_index: int = -100,
    ignore_token_ids: Iterable[int] = (),
    tools: list[Any] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    train_turn_suffix: bool = False,
) -> EncodedDataset:
    """Encode many samples and account for those left with nothing to train.

    A sample is ``{"messages": [...]}`` (encoded by :func:`encode_chat`, with its
    own ``"tools"`` if it has them) or ``{"prompt": ..., "completion": ...}``
    (encoded by :func:`encode_prompt_completion`). ``mode``, ``mask_history``,
    ``tools``, ``chat_template_kwargs`` and ``train_turn_suffix`` apply to conversations; ``add_eos`` and
    ``eos_token_id`` to prompt/completion pairs; ``train_on_prompt`` to both.

    A sample with no target (nothing in ``labels[1:]`` is trained, usually because
    truncation cut every trained token) contributes nothing to the loss but still
    costs compute and dilutes per-sequence averages; it is never passed on
    silently:

    * ``on_empty="warn"``: kept, and a :class:`NoTargetWarning` gives the count;
    * ``on_empty="drop"``: left out, and the warning says how many were dropped;
    * ``on_empty="error"``: ``ValueError``.

    Returns:
        An :class:`EncodedDataset` (a list of :class:`Example`) whose ``.report``
        (:class:`DatasetReport`) holds the counts and the indices of empty samples.
    """
    check_choice("on_empty", on_empty, _ON_EMPTY)
    # Validate the options once, so that a bad option is not reported as "sample 0".
    resolve_mode(mode, mask_history, train_on_prompt)
    options = common_options(max_length, truncation_side, ignore_index, ignore_token_ids)
    check_flag("add_eos", add_eos)
    check_template_kwargs(chat_template_kwargs)
    check_flag("train_turn_suffix", train_turn_suffix)
    chat = dict(
        mode=mode,
        mask_history=mask_history,
        chat_template_kwargs=chat_template_kwargs,
        train_turn_suffix=train_turn_suffix,
    )
    pair = dict(add_eos=add_eos, eos_token_id=eos_token_id)
    common = dict(
        train_on_prompt=train_on_prompt, max_length=max_length, truncation_side=truncation_side,
        ignore_index=ignore_index, ignore_token_ids=options.ignore_token_ids,
    )  # fmt: skip
    examples: list[Example] = []
    for index, sample in enumerate(samples):
        try:
            examples.append(_encode_sample(sample, tokenizer, tools, chat, pair, common))
        except (TypeError, ValueError) as err:
            kind = TypeError if isinstance(err, TypeError) else ValueError
            raise kind(f"sample {index}: {err}") from err
    empty = tuple(i for i, ex in enumerate(examples) if num_targets(ex["labels"], ignore_index) == 0)
    dropped = len(empty) if on_empty == "drop" else 0
    report = DatasetReport(len(examples), len(empty), empty, dropped, max_length)
    if empty:
        _report_empty(report, on_empty)
    if dropped:
        skip = set(empty)
        examples = [ex for i, ex in enumerate(examples) if i not in skip]
    return EncodedDataset(examples, report)


def _encode_sample(
    sample: object, tokenizer: Any, tools: Any, chat: dict[str, Any], pair: dict[str, Any], common: dict[str, Any]
) -> Example:
    if not isinstance(sample, Mapping):
        raise TypeError(f"a sample must be a dict, got {preview(sample)}")
    is_chat, is_pair = "messages" in sample, "prompt" in sample and "completion" in sample
    if is_chat and ("prompt" in sample or "completion" in sample):
        raise ValueError("the sample has both 'messages' and 'prompt'/'completion'; keep one format")
    if is_chat:
        sample_tools = sample.get("tools", tools)
        return encode_chat(sample["messages"], tokenizer, tools=sample_tools, **chat, **common)
    if is_pair:
        train_on_prompt = bool(common["train_on_prompt"])  # None (the chat default) means False
        options = dict(common, train_on_prompt=train_on_prompt)
        return encode_prompt_completion(sample["prompt"], sample["completion"], tokenizer, **pair, **options)
    raise ValueError(
        f"a sample needs 'messages' or both 'prompt' and 'completion'; it has keys {sorted(map(str, sample))}"
    )


def _report_empty(report: DatasetReport, on_empty: str) -> None:
    where = (
        f"after truncation to max_length={report.max_length}"
        if report.max_length is not None
        else "(no trained token after position 0)"
    )
    shown = ", ".join(map(str, report.empty_indices[:10])) + (", ..." if report.num_empty > 10 else "")
    message = f"{report.num_empty} of {report.num_samples} samples have no target {where} (indices {shown})"
    if on_empty == "error":
        raise ValueError(f"{message}; pass on_empty='drop' to drop them, or raise max_length")
    if on_empty == "drop":
        warnings.warn(f"{message}; dropped them (on_empty='drop')", NoTargetWarning, stacklevel=3)
    else:
        warnings.warn(
            f"{message}; pass on_empty='drop' to drop them. They add nothing to the loss.",
            NoTargetWarning,
            stacklevel=3,
        )
