"""``encode_prompt_completion``: a prompt and its completion with a completion-only loss."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from lmloss.labels.example import Example, finish_example
from lmloss.labels.options import CommonOptions, TruncationSide, check_flag, common_options, preview
from lmloss.labels.tokens import window_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["encode_prompt_completion"]


def encode_prompt_completion(
    prompt: str | Sequence[int],
    completion: str | Sequence[int],
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    add_eos: bool = True,
    eos_token_id: int | None = None,
    train_on_prompt: bool = False,
    max_length: int | None = None,
    truncation_side: TruncationSide = "right",
    ignore_index: int = -100,
    ignore_token_ids: Iterable[int] = (),
) -> Example:
    """Encode a prompt and its completion with a completion-only loss.

    ``input_ids = prompt_ids + completion_ids + [eos]`` and ``labels`` are
    ``ignore_index`` over the prompt and the ids themselves over the completion
    and the EOS (shape ``[T]`` each, as lists).

    Args:
        prompt, completion: text (needs ``tokenizer``) or token ids (used as given).
            Text is tokenized piece by piece without special tokens, so the boundary
            is exactly where the prompt ends, as at inference (the ids may differ
            from those of the joined text where BPE would merge across it; a
            SentencePiece tokenizer that prepends a space to every text prepends one
            to the completion too). A text prompt gets the tokenizer's leading
            special tokens (e.g. BOS) if it adds any; no special token is ever put
            between prompt and completion.
        tokenizer: any transformers tokenizer; only needed for text.
        add_eos: append the EOS after the completion (not if it already ends with
            it). The EOS is a target, placed by position, so ``pad == eos`` does not
            mask it.
        eos_token_id: the EOS id; defaults to ``tokenizer.eos_token_id``.
        train_on_prompt: train the prompt tokens too.
        max_length: keep at most this many tokens (see ``truncation_side``).
        truncation_side: ``"right"`` drops the end, ``"left"`` the beginning.
        ignore_index: the label of tokens that are not trained.
        ignore_token_ids: token ids that are never targets (image placeholders...).

    Returns:
        An :class:`Example`.
    """
    options = common_options(max_length, truncation_side, ignore_index, ignore_token_ids)
    check_flag("add_eos", add_eos)
    check_flag("train_on_prompt", train_on_prompt)
    prompt_ids, completion_ids = _pair_ids(prompt, completion, tokenizer, options)
    if add_eos:
        eos = _resolve_eos(eos_token_id, tokenizer)
        if not completion_ids or completion_ids[-1] != eos:
            completion_ids.append(eos)
    trained = [train_on_prompt] * len(prompt_ids) + [True] * len(completion_ids)
    return finish_example(prompt_ids + completion_ids, trained, options)


def _pair_ids(
    prompt: object, completion: object, tokenizer: Any, options: CommonOptions
) -> tuple[list[int], list[int]]:
    """Prompt ids (with the leading special tokens) and completion ids.

    With ``max_length``, text that truncation drops is not tokenized: the side that is
    cut first (the completion for right truncation, the prompt for left) is skipped
    when the other already fills ``max_length``, and a long text is tokenized only
    in a window (:mod:`lmloss._text_window`), so the tokens kept are those of the
    whole and memory stays bounded by ``max_length``.
    """
    _check_ids_or_text("prompt", prompt, tokenizer)
    _check_ids_or_text("completion", completion, tokenizer)
    m = options.max_length
    if m is None:
        prompt_ids = window_ids(tokenizer, prompt, None, "right", True)[0]
        return prompt_ids, window_ids(tokenizer, completion, None, "right")[0]
    if options.truncation_side == "right":
        prompt_ids, whole = window_ids(tokenizer, prompt, m, "right", True)
        if not whole:
            return prompt_ids, []
        return prompt_ids, window_ids(tokenizer, completion, m - len(prompt_ids), "right")[0]
    completion_ids, whole = window_ids(tokenizer, completion, m, "left")
    if not whole:
        return [], completion_ids
    return window_ids(tokenizer, prompt, m - len(completion_ids), "left", True)[0], completion_ids


def _check_ids_or_text(name: str, value: object, tokenizer: Any) -> None:
    if isinstance(value, str):
        if tokenizer is None:
            raise TypeError(f"{name} is text, so a tokenizer is needed: pass tokenizer=..., or pass token ids")
        return
    if (
        isinstance(value, Sequence)
        and not isinstance(value, bytes)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    ):
        return
    raise TypeError(
        f"{name} must be a str or a list of int token ids >= 0 (use .tolist() for tensors), got {preview(value)}"
    )


def _resolve_eos(eos_token_id: object, tokenizer: Any) -> int:
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if eos_token_id is None:
            raise ValueError(
                "add_eos=True but there is no EOS id: pass eos_token_id=..., a tokenizer with an "
                "eos_token, or add_eos=False"
            )
    if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int) or eos_token_id < 0:
        raise TypeError(f"eos_token_id must be an int >= 0, got {eos_token_id!r}")
    return eos_token_id
