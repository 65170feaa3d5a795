"""Labels: which tokens of a sample are trained.

Every encoder here returns an :class:`Example`, two plain Python lists of the same
length that a collator can pad or pack::

    {"input_ids": [t0, t1, ..., t_{T-1}], "labels": [l0, l1, ..., l_{T-1}]}

Labels are *unshifted*, as in transformers: ``labels[t] == input_ids[t]`` where
token ``t`` is trained and ``ignore_index`` (``-100``) elsewhere. The loss
(:func:`lmloss.causal_lm_loss`, ``shift=True``) does the next-token shift, so the
token at position 0 can never be a target: it has nothing before it to predict it
from. That is why "has a target" means ``labels[1:]`` holds a non-ignored value.

Labels are always built *by position* (which characters of the text a token came
from), never by comparing token ids with ``pad_token_id`` or searching for a
response template's ids. Two well-known failures follow from the other ways:

* with ``pad == eos`` a rule such as ``labels[input_ids == pad] = -100`` also masks
  the real EOS, and the model never learns to stop (TRL #1623);
* a response template tokenized on its own (``"<|im_start|>assistant\\n"``,
  ``"### Assistant:"``) is often not a sub-sequence of the conversation's tokens,
  because BPE merges it with its neighbours; searching for it then silently masks
  whole rows (TRL #598, #622, #980).

Chat conversations (:func:`encode_chat`) are labelled in three steps:

1. *Render turn by turn.* The chat template renders ``messages[:i]`` with the
   generation prompt and ``messages[:i+1]`` without it; both must be prefixes of
   the whole conversation's rendering, and the characters between them are
   assistant turn ``i``: its content and its end-of-turn marker (``<|im_end|>``,
   ``<|eot_id|>``, ``</s>``...). Trailing whitespace after the marker is template
   scaffolding and is not trained; neither is the generation prompt.
2. *Map characters to tokens.* The whole rendering is tokenized once (as
   ``apply_chat_template`` does, without adding special tokens); a token is trained
   when its character range overlaps a trained span (``return_offsets_mapping`` on
   fast tokenizers; for tokenizers without offsets, by tokenizing rendered
   prefixes and comparing them with the full token sequence).
3. *Mask* the ``ignore_token_ids`` (image/video placeholders) in every mode, then
   truncate to ``max_length``.

The end-of-turn marker is a target even when it is not ``tokenizer.eos_token``
(Llama 3 ends turns with ``<|eot_id|>`` while its eos is ``<|end_of_text|>``):
it is what the model must emit to end its turn, so generation should stop on it.

What templates must do, and what happens when they don't:

* Rendering ``messages[:k]`` must give a prefix of rendering ``messages``. Templates
  that rewrite earlier turns (Qwen3 drops the reasoning of past assistant turns),
  render the last turn differently, or merge consecutive messages (Qwen2.5 puts
  consecutive tool results in one block) break this; ``encode_chat`` then raises a
  ``ValueError`` instead of guessing. Only the turns a mode needs are rendered:
  ``"everything"`` works with any template, ``"last_assistant"`` needs only the last
  assistant turn, ``"assistant"`` every assistant turn, ``"all"`` every turn.
* A template without a generation prompt (or that ignores
  ``add_generation_prompt``): the reply starts where its content does.
* In ``"all"`` mode the content of non-assistant turns is found as text in its
  turn (also stripped, as Llama 3 trims it); a template that otherwise changes
  the content makes ``"all"`` raise.
* A token that BPE merged across a span boundary (``" Sure"`` where the template
  ends with a space and the reply starts with "Sure") is trained: it carries
  content. Its label is that merged token, as ``apply_chat_template`` would
  tokenize the conversation.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict, overload

import torch

from lmloss._text_window import enough_tokens, max_token_chars, text_windows
from lmloss._validation import check_choice, check_int

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CHAT_MODES",
    "KNOWN_ROLES",
    "ChatMode",
    "DatasetReport",
    "EncodedDataset",
    "Example",
    "NoTargetWarning",
    "encode_chat",
    "encode_dataset",
    "encode_prompt_completion",
    "mask_token_ids",
    "template_mask_mismatches",
]

ChatMode = Literal["assistant", "all", "last_assistant", "everything"]
OnEmpty = Literal["warn", "drop", "error"]
TruncationSide = Literal["right", "left"]

#: The values of ``mode`` in :func:`encode_chat`.
CHAT_MODES: tuple[str, ...] = ("assistant", "all", "last_assistant", "everything")
#: Message roles :func:`encode_chat` accepts.
# "ipython" (Llama 3.1 tool output) and "function" (OpenAI's legacy tool role) are tool turns.
KNOWN_ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool", "ipython", "function")
_ON_EMPTY = ("warn", "drop", "error")
_TRUNCATION_SIDES = ("right", "left")
# apply_chat_template arguments that encode_chat sets itself.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation", "tools", "tokenize", "add_generation_prompt", "continue_final_message",
        "return_dict", "return_assistant_tokens_mask", "padding", "truncation", "max_length",
        "return_tensors", "tokenizer_kwargs",
    }
)  # fmt: skip


class Example(TypedDict):
    """One encoded sample: ``input_ids`` and unshifted ``labels``, both of length ``T``.

    ``labels[t]`` is ``input_ids[t]`` where token ``t`` is a target and
    ``ignore_index`` elsewhere. There is no ``attention_mask``: collators make it.
    """

    input_ids: list[int]
    labels: list[int]


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


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class _Common:
    """Options shared by every encoder, validated once."""

    max_length: int | None
    truncation_side: str
    ignore_index: int
    ignore_token_ids: frozenset[int]


def _common_options(
    max_length: object, truncation_side: object, ignore_index: object, ignore_token_ids: object
) -> _Common:
    if max_length is not None:
        check_int("max_length", max_length)
        if max_length < 1:  # type: ignore[operator]
            raise ValueError(f"max_length must be None or an int >= 1, got {max_length}")
    check_choice("truncation_side", truncation_side, _TRUNCATION_SIDES)
    check_int("ignore_index", ignore_index)
    return _Common(
        max_length=max_length,  # type: ignore[arg-type]
        truncation_side=truncation_side,  # type: ignore[arg-type]
        ignore_index=ignore_index,  # type: ignore[arg-type]
        ignore_token_ids=check_token_id_set("ignore_token_ids", ignore_token_ids),
    )


def check_token_id_set(name: str, value: object) -> frozenset[int]:
    """A collection of token ids (ints >= 0); a str or a lone int is a mistake, not a set."""
    if isinstance(value, (str, bytes, int)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list/tuple/set of int token ids, got {value!r}")
    ids = list(value)
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise TypeError(
                f"{name} must hold int token ids, got {token_id!r}; convert token strings "
                f"with tokenizer.convert_tokens_to_ids(...)"
            )
        if token_id < 0:
            raise ValueError(f"{name} must hold token ids >= 0, got {token_id}")
    return frozenset(ids)


def _check_bool(name: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, bool):
        kind = "a bool or None" if optional else "a bool"
        raise TypeError(f"{name} must be {kind}, got {value!r}")


def _resolve_mode(mode: object, mask_history: object, train_on_prompt: object) -> str:
    """Map LLaMA-Factory's ``mask_history``/``train_on_prompt`` flags onto ``mode``.

    ``mask_history=True`` is ``mode="last_assistant"``, ``train_on_prompt=True`` is
    ``mode="everything"``; an explicit mode other than the default ``"assistant"``
    that says something else is a contradiction, not a preference.
    """
    check_choice("mode", mode, CHAT_MODES)
    _check_bool("mask_history", mask_history, optional=True)
    _check_bool("train_on_prompt", train_on_prompt, optional=True)
    if mask_history and train_on_prompt:
        raise ValueError(
            "mask_history=True (train only the last assistant turn) contradicts train_on_prompt=True "
            "(train every token); pass one of them, or mode='last_assistant' / mode='everything'"
        )
    for flag, value, implied in (
        ("mask_history", mask_history, "last_assistant"),
        ("train_on_prompt", train_on_prompt, "everything"),
    ):
        if value is True and mode not in ("assistant", implied):
            raise ValueError(f"{flag}=True means mode={implied!r}, but mode={mode!r} was given; pass only one")
        if value is True:
            return implied
        if value is False and mode == implied:
            raise ValueError(f"{flag}=False contradicts mode={implied!r}; pass only one of them")
    return mode  # type: ignore[return-value]


# ------------------------------------------------------------------ shared building


def _num_targets(labels: Sequence[int], ignore_index: int) -> int:
    """Targets the shifted loss can score: position 0 never is one."""
    return sum(1 for label in labels[1:] if label != ignore_index)


def _finish(ids: Sequence[int], trained: Sequence[bool], options: _Common) -> Example:
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


# -------------------------------------------------------------- prompt / completion


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
    options = _common_options(max_length, truncation_side, ignore_index, ignore_token_ids)
    _check_bool("add_eos", add_eos)
    _check_bool("train_on_prompt", train_on_prompt)
    prompt_ids, completion_ids = _pair_ids(prompt, completion, tokenizer, options)
    if add_eos:
        eos = _resolve_eos(eos_token_id, tokenizer)
        if not completion_ids or completion_ids[-1] != eos:
            completion_ids.append(eos)
    trained = [train_on_prompt] * len(prompt_ids) + [True] * len(completion_ids)
    return _finish(prompt_ids + completion_ids, trained, options)


def _pair_ids(prompt: object, completion: object, tokenizer: Any, options: _Common) -> tuple[list[int], list[int]]:
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
        return _window_ids(tokenizer, prompt, None, "right", True)[0], _window_ids(tokenizer, completion, None, "right")[0]
    if options.truncation_side == "right":
        prompt_ids, whole = _window_ids(tokenizer, prompt, m, "right", True)
        if not whole:
            return prompt_ids, []
        return prompt_ids, _window_ids(tokenizer, completion, m - len(prompt_ids), "right")[0]
    completion_ids, whole = _window_ids(tokenizer, completion, m, "left")
    if not whole:
        return [], completion_ids
    return _window_ids(tokenizer, prompt, m - len(completion_ids), "left", True)[0], completion_ids


def _check_ids_or_text(name: str, value: object, tokenizer: Any) -> None:
    if isinstance(value, str):
        if tokenizer is None:
            raise TypeError(f"{name} is text, so a tokenizer is needed: pass tokenizer=..., or pass token ids")
        return
    if (isinstance(value, Sequence) and not isinstance(value, bytes)
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)):
        return
    raise TypeError(
        f"{name} must be a str or a list of int token ids >= 0 (use .tolist() for tensors), got {_preview(value)}"
    )


def _window_ids(
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
        if whole or enough_tokens(len(ids), need):  # type: ignore[arg-type]
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


def _preview(value: object, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


# -------------------------------------------------------------------------- chat


def encode_chat(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    mode: ChatMode = "assistant",
    mask_history: bool | None = None,
    train_on_prompt: bool | None = None,
    max_length: int | None = None,
    truncation_side: TruncationSide = "right",
    ignore_index: int = -100,
    ignore_token_ids: Iterable[int] = (),
    tools: list[Any] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    train_turn_suffix: bool = False,
) -> Example:
    """Encode a conversation with the tokenizer's chat template and label its turns.

    Works with any tokenizer that has a chat template: turn boundaries come from
    rendering the conversation turn by turn, and tokens are matched to them by
    character offsets (see the module docstring), never by searching token ids.

    Args:
        messages: ``[{"role": ..., "content": str}, ...]``, roles in :data:`KNOWN_ROLES`;
            other keys (``tool_calls``, ``name``...) are passed to the template.
        tokenizer: a transformers tokenizer with ``chat_template`` set.
        mode: which tokens are targets.

            * ``"assistant"``: every assistant turn (content + end-of-turn marker).
            * ``"all"``: assistant turns as above, plus the content of every other
              turn (user, system, tool); not the template scaffolding around it
              (``<|im_start|>user\\n``, ``<|im_end|>``, a default system prompt).
            * ``"last_assistant"``: only the last assistant turn (LLaMA-Factory's
              ``mask_history``; token for token with ``train_turn_suffix=True``).
            * ``"everything"``: every token (LLaMA-Factory's ``train_on_prompt``).
        mask_history, train_on_prompt: LLaMA-Factory spellings of the modes above;
            ``True`` selects them, and contradicting an explicit ``mode`` is an error.
        max_length: keep at most this many tokens (see ``truncation_side``).
        truncation_side: ``"right"`` drops the end, ``"left"`` the beginning.
        ignore_index: the label of tokens that are not trained.
        ignore_token_ids: token ids that are never targets, in every mode
            (e.g. Qwen2-VL's ``<|image_pad|>``/``<|video_pad|>``).
        tools: tool schemas passed to the template.
        chat_template_kwargs: extra template variables (e.g. ``{"enable_thinking": False}``).
        train_turn_suffix: also train what the template writes after a trained turn's
            end-of-turn marker (the ``"\n"`` after ``<|im_end|>`` in ChatML), as
            LLaMA-Factory does (its ``qwen`` template trains ``content + "<|im_end|>\n"``).
            Default ``False``: that whitespace is scaffolding before the next turn, and
            a model stopping at ``<|im_end|>`` never emits it.

    Returns:
        An :class:`Example` whose ``input_ids`` are those of
        ``apply_chat_template(messages)`` (before truncation).

    Raises:
        ValueError: malformed messages; no assistant turn in an assistant mode; a
            tokenizer without chat template; a template whose rendering of the first
            turns is not a prefix of the whole rendering (templates that rewrite
            earlier turns: use ``mode="everything"`` or ``"last_assistant"``).
    """
    mode = _resolve_mode(mode, mask_history, train_on_prompt)  # type: ignore[assignment]
    options = _common_options(max_length, truncation_side, ignore_index, ignore_token_ids)
    messages = _none_content_as_empty(messages)
    _check_messages(messages, mode)
    renderer = _Renderer(tokenizer, messages, tools, chat_template_kwargs)
    if mode != "everything":
        _check_bool("train_turn_suffix", train_turn_suffix)
    spans = None if mode == "everything" else _trained_spans(renderer, mode, turn_suffix=train_turn_suffix)
    ids, trained = _window_tokens(tokenizer, renderer.full, spans, options)
    return _finish(ids, trained, options)


def _window_tokens(
    tokenizer: Any, text: str, spans: list[tuple[int, int]] | None, options: _Common
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
        if len(piece) == len(text) or enough_tokens(len(ids), m):  # type: ignore[arg-type]
            break
    return ids, trained


def _spans_in_window(spans: list[tuple[int, int]], start: int, length: int) -> list[tuple[int, int]]:
    """``spans`` (sorted, disjoint) in the coordinates of ``text[start:start + length]``, clipped to it."""
    clipped = [(max(a - start, 0), min(b - start, length)) for a, b in spans]
    return [(a, b) for a, b in clipped if a < b]


def _none_content_as_empty(messages: Any) -> Any:
    """OpenAI-style tool-call turns carry ``"content": None`` (only those: elsewhere None is
    an error); templates treat it like ``""``
    (both falsy), and so does the labelling (which needs a string to locate)."""
    if not isinstance(messages, (list, tuple)):
        return messages
    return [dict(m, content="") if isinstance(m, Mapping) and m.get("content", "") is None and m.get("tool_calls")
            else m for m in messages]


def _check_messages(messages: object, mode: str) -> None:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {_preview(messages)}")
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {_preview(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise TypeError(f"messages[{i}]['role'] must be a str, got {role!r}")
        if role not in KNOWN_ROLES:
            raise ValueError(
                f"messages[{i}]['role'] = {role!r} is not a known role ({', '.join(KNOWN_ROLES)}); "
                f"rename it (ShareGPT data: 'human' -> 'user', 'gpt' -> 'assistant')"
            )
        if not isinstance(content, str):
            raise TypeError(
                f"messages[{i}]['content'] must be a str, got {_preview(content)}; use '' for a turn "
                f"with only tool_calls, and write images as their placeholder text"
            )
    roles = [m["role"] for m in messages]
    if mode in ("assistant", "last_assistant") and "assistant" not in roles:
        raise ValueError(
            f"the conversation {_describe(messages)} has no assistant turn, so mode={mode!r} would train "
            f"nothing; add an assistant reply, drop the sample, or use mode='all' or 'everything'"
        )


def _describe(messages: Sequence[Mapping[str, Any]]) -> str:
    """A short name for a conversation in error messages: its roles and first words."""
    roles = ", ".join(m["role"] for m in messages)
    return f"(roles: {roles}; first message: {_preview(messages[0]['content'], 40)})"


class _Renderer:
    """Renders prefixes of one conversation and places them in the full rendering.

    Turn boundaries are read off renderings of ``messages[:k]``. They only mean
    something if each such rendering is a prefix of the whole conversation's, so
    :meth:`end` checks it and refuses templates that rewrite earlier turns.
    """

    def __init__(self, tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: Any, kwargs: object) -> None:
        _check_chat_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.messages = list(messages)
        self.tools = tools
        self.kwargs = _check_template_kwargs(kwargs)
        self.full = self.render(self.messages)
        self._ends: dict[tuple[int, bool], int] = {}

    def render(self, messages: Sequence[Mapping[str, Any]], generation_prompt: bool = False) -> str:
        import jinja2  # transformers renders chat templates with jinja2

        try:
            text = self.tokenizer.apply_chat_template(
                list(messages), tools=self.tools, tokenize=False,
                add_generation_prompt=generation_prompt, **self.kwargs,
            )  # fmt: skip
        except jinja2.TemplateError as err:
            raise ValueError(
                f"the chat template failed on the first {len(messages)} message(s) of the conversation "
                f"{_describe(self.messages)} (lmloss renders conversations turn by turn to find turns): {err}"
            ) from err
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
        return text

    def end(self, k: int, generation_prompt: bool = False) -> int:
        """Where the rendering of ``messages[:k]`` (+ generation prompt) ends in ``full``."""
        if k == 0 and not generation_prompt:
            return 0
        if (k, generation_prompt) not in self._ends:  # each turn's start and end are asked for twice
            text = self.render(self.messages[:k], generation_prompt)
            if not self.full.startswith(text):
                raise ValueError(_not_a_prefix(k, generation_prompt, text, self.full))
            self._ends[k, generation_prompt] = len(text)
        return self._ends[k, generation_prompt]


def _not_a_prefix(k: int, generation_prompt: bool, text: str, full: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(text, full, strict=False)) if a != b), min(len(text), len(full)))
    what = f"the first {k} message(s)" + (" with the generation prompt" if generation_prompt else "")
    return (
        f"the chat template renders {what} as text that is not a prefix of the whole conversation's "
        f"rendering (they differ at character {at}: {text[at : at + 30]!r} vs {full[at : at + 30]!r}), so turns "
        f"cannot be found by rendering turn by turn. Templates do this when they rewrite earlier turns "
        f"(e.g. drop the reasoning of past assistant turns) or render the last turn differently. "
        f"Use mode='last_assistant' (needs only the last turn) or mode='everything', or a template "
        f"that renders every turn the same way wherever it is"
    )


def _check_chat_tokenizer(tokenizer: object) -> None:
    if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
        raise TypeError(f"encode_chat needs a transformers tokenizer, got {_preview(tokenizer)}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template: set tokenizer.chat_template to a Jinja template "
            "(e.g. the 'chat_template' of the instruct model's tokenizer_config.json), or encode "
            "prompt/completion pairs with encode_prompt_completion"
        )


def _check_template_kwargs(kwargs: object) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"chat_template_kwargs must be a dict with str keys, got {_preview(kwargs)}")
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {reserved}: encode_chat sets them itself")
    return dict(kwargs)


# ------------------------------------------------------------- turns to char spans


def _trained_spans(renderer: _Renderer, mode: str, *, turn_suffix: bool = False) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of ``renderer.full`` whose tokens are trained."""
    roles = [m["role"] for m in renderer.messages]
    assistant = [i for i, role in enumerate(roles) if role == "assistant"]
    if mode == "last_assistant":
        assistant = assistant[-1:]
    spans: list[tuple[int, int] | None] = [_assistant_span(renderer, i, turn_suffix) for i in assistant]
    if mode == "all":
        spans += [_content_span(renderer, i) for i, role in enumerate(roles) if role != "assistant"]
    return sorted(span for span in spans if span is not None and span[0] < span[1])


def _assistant_span(renderer: _Renderer, i: int, turn_suffix: bool = False) -> tuple[int, int]:
    """Assistant turn ``i``: from the end of the generation prompt to its end-of-turn marker
    (``turn_suffix``: to the end of the turn, the whitespace after the marker included)."""
    turn_start, turn_end = renderer.end(i), renderer.end(i + 1)
    # messages[:0] cannot be rendered (empty conversation), so a conversation that
    # opens with the assistant has no generation prompt to measure.
    start = renderer.end(i, generation_prompt=True) if i > 0 else turn_start
    if start == turn_start:
        # No generation prompt (the template ignores add_generation_prompt, or its
        # assistant turns have no header): the reply starts where its content does.
        content = _content_span(renderer, i)
        start = content[0] if content is not None else _empty_content_start(renderer, i)
    if not turn_start <= start <= turn_end:
        raise ValueError(
            f"the generation prompt of assistant turn {i} ends outside the turn ({start} not in "
            f"[{turn_start}, {turn_end}]); this chat template cannot be labelled turn by turn"
        )
    # Keep the end-of-turn marker, drop the newline(s) the template writes after it:
    # those are scaffolding that precedes the next turn.
    end = turn_end
    while not turn_suffix and end > start and renderer.full[end - 1].isspace():
        end -= 1
    if end == turn_end and i + 1 < len(renderer.messages):
        # Templates that write the end-of-turn marker only before a following turn
        # (``{% if not loop.last %}``, or at the start of the next turn) put it after
        # ``end(i + 1)``: it still ends this reply, so it is a target.
        eos = getattr(renderer.tokenizer, "eos_token", None)
        if isinstance(eos, str) and eos and renderer.full.startswith(eos, turn_end):
            end = turn_end + len(eos)
    return start, end


def _content_span(renderer: _Renderer, i: int) -> tuple[int, int] | None:
    """Where message ``i``'s content is in its turn; ``None`` if the content is empty.

    First the turn is rendered with a unique marker in place of the content: if
    putting the content (or, as Llama 3 trims it, the stripped content) back where
    the marker is gives the real turn, the marker's position is the content's.
    Otherwise the content is searched for as text; when it occurs several times
    (short contents also occur in the scaffolding: "e" in "<|im_end|>"), the
    occurrence whose removal leaves the rendering of an empty message is the
    content, and a tie is an error rather than a guess.
    """
    turn_start, turn_end = renderer.end(i), renderer.end(i + 1)
    turn = renderer.full[turn_start:turn_end]
    content = renderer.messages[i]["content"]
    if not content:
        return None
    if not content.strip() and _turn_with_content(renderer, i, "") == turn:
        # Whitespace the template trims away (Llama 3's ``| trim``): nothing of it is rendered.
        return None
    at_marker = _content_by_marker(renderer, i, turn)
    if at_marker is not None:
        at, length = at_marker
        return turn_start + at, turn_start + at + length
    for text in (content, content.strip()):
        if not text:
            return None
        hits = [p for p in range(len(turn) - len(text) + 1) if turn.startswith(text, p)]
        if hits:
            at = hits[0] if len(hits) == 1 else _pick_content(renderer, i, turn, text, hits)
            return turn_start + at, turn_start + at + len(text)
    raise ValueError(
        f"the content of message {i} ({renderer.messages[i]['role']}) does not appear in its rendered "
        f"turn {turn!r}: the chat template changes it, so its tokens cannot be located; use "
        f"mode='assistant' or mode='everything'"
    )


_MARKER = "\x00lmloss-content\x00"


def _content_by_marker(renderer: _Renderer, i: int, turn: str) -> tuple[int, int] | None:
    """``(offset in turn, length)`` of message ``i``'s content found with a marker, or ``None``."""
    with_marker = _turn_with_content(renderer, i, _MARKER)
    if with_marker is None or with_marker.count(_MARKER) != 1:
        return None
    at = with_marker.index(_MARKER)
    content = renderer.messages[i]["content"]
    for text in (content, content.strip()):
        if text and with_marker.replace(_MARKER, text, 1) == turn:
            return at, len(text)
    return None


def _empty_content_start(renderer: _Renderer, i: int) -> int:
    """Where the (empty) content of message ``i`` sits: render a marker in its place.

    The marker's position counts only if removing it gives back the real turn,
    i.e. the template treats the content as an opaque string.
    """
    marker = _MARKER
    with_marker = _turn_with_content(renderer, i, marker)
    turn = renderer.full[renderer.end(i) : renderer.end(i + 1)]
    if with_marker is not None and with_marker.replace(marker, "", 1) == turn:
        return renderer.end(i) + with_marker.index(marker)
    raise ValueError(
        f"cannot find where assistant turn {i} starts: the template has no generation prompt and "
        f"the turn's content is empty"
    )


def _pick_content(renderer: _Renderer, i: int, turn: str, text: str, hits: list[int]) -> int:
    """Among several occurrences of ``text`` in ``turn``, the one the content fills."""
    empty_turn = _turn_with_content(renderer, i, "")
    matches = [at for at in hits if turn[:at] + turn[at + len(text) :] == empty_turn]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(
        f"the content of message {i} ({renderer.messages[i]['role']}) occurs {len(hits)} times in its "
        f"rendered turn {turn!r} and the chat template changes it, so which occurrence is the content "
        f"cannot be decided; use mode='assistant' or mode='everything'"
    )


def _turn_with_content(renderer: _Renderer, i: int, content: str) -> str | None:
    """The text of turn ``i`` rendered with another content (``None`` if that changes earlier turns)."""
    prefix = renderer.full[: renderer.end(i)]
    rendered = renderer.render([*renderer.messages[:i], dict(renderer.messages[i], content=content)])
    return rendered[len(prefix) :] if rendered.startswith(prefix) else None


# ------------------------------------------------------------- char spans to tokens


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


# ----------------------------------------------------------------------- datasets


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
    _resolve_mode(mode, mask_history, train_on_prompt)
    options = _common_options(max_length, truncation_side, ignore_index, ignore_token_ids)
    _check_bool("add_eos", add_eos)
    _check_template_kwargs(chat_template_kwargs)
    _check_bool("train_turn_suffix", train_turn_suffix)
    chat = dict(mode=mode, mask_history=mask_history, chat_template_kwargs=chat_template_kwargs,
                train_turn_suffix=train_turn_suffix)
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
    empty = tuple(i for i, ex in enumerate(examples) if _num_targets(ex["labels"], ignore_index) == 0)
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
        raise TypeError(f"a sample must be a dict, got {_preview(sample)}")
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


# ----------------------------------------------------------------- placeholder ids


@overload
def mask_token_ids(labels: torch.Tensor, token_ids: Iterable[int], ignore_index: int = -100) -> torch.Tensor: ...
@overload
def mask_token_ids(labels: list[int], token_ids: Iterable[int], ignore_index: int = -100) -> list[int]: ...
@overload
def mask_token_ids(labels: list[list[int]], token_ids: Iterable[int], ignore_index: int = -100) -> list[list[int]]: ...
def mask_token_ids(labels: Any, token_ids: Iterable[int], ignore_index: int = -100) -> Any:
    """Set ``labels`` to ``ignore_index`` wherever they hold one of ``token_ids``.

    For placeholder tokens that must never be targets, such as Qwen2-VL's
    ``<|image_pad|>``/``<|video_pad|>``: the model sees them in its input, but their
    "next token" is decided by the image, not predicted by the model.

    Args:
        labels: a ``[..., T]`` integer tensor, a ``list[int]`` or a list of such lists.
        token_ids: ids to mask.
        ignore_index: the value written in their place.

    Returns:
        A new object of the same kind (the input is not modified).
    """
    ids = check_token_id_set("token_ids", token_ids)
    check_int("ignore_index", ignore_index)
    if isinstance(labels, torch.Tensor):
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if not ids:
            return labels.clone()
        table = torch.tensor(sorted(ids), dtype=labels.dtype, device=labels.device)
        return labels.masked_fill(torch.isin(labels, table), ignore_index)
    if isinstance(labels, list):
        return _mask_list(labels, ids, ignore_index)
    raise TypeError(f"labels must be a torch.Tensor or a list of ints, got {type(labels).__name__}")


def _mask_list(labels: list[Any], ids: frozenset[int], ignore_index: int) -> list[Any]:
    out: list[Any] = []
    for label in labels:
        if isinstance(label, list):
            out.append(_mask_list(label, ids, ignore_index))
        elif isinstance(label, int) and not isinstance(label, bool):
            out.append(ignore_index if label in ids else label)
        else:
            raise TypeError(f"labels must hold ints (or lists of ints), got {_preview(label)}")
    return out


# ------------------------------------------------------ cross-check with the template


def template_mask_mismatches(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    tools: list[Any] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Positions where :func:`encode_chat`'s labels and the template's own assistant mask differ.

    A chat template with ``{% generation %}`` / ``{% endgeneration %}`` markers says
    itself which tokens are the assistant's; transformers returns them with
    ``apply_chat_template(..., return_assistant_tokens_mask=True)`` (TRL's
    ``assistant_only_loss`` trains those). This compares that mask with the targets of
    ``encode_chat(messages, tokenizer, mode="assistant")``, an independent derivation
    (turn by turn rendering, character offsets): ``[]`` means they agree token for token.

    Returns:
        The token positions (indices into ``input_ids``) that one trains and the other
        does not, in increasing order.

    Raises:
        ValueError: the template has no generation markers, or the two token sequences differ.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not re.search(r"\{%-?\s*generation\s*-?%\}", template):
        raise ValueError(
            "the tokenizer's chat template has no {% generation %} markers, so it defines no assistant mask "
            "to compare with; wrap each assistant reply the template writes in {% generation %}...{% endgeneration %}"
        )
    kwargs = _check_template_kwargs(chat_template_kwargs)
    example = encode_chat(messages, tokenizer, tools=tools, chat_template_kwargs=chat_template_kwargs)
    template_tokenizer: Any = tokenizer  # the typed stub knows neither return_dict's result nor Mapping messages
    rendered: Any = template_tokenizer.apply_chat_template(
        list(messages), tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )
    if list(rendered["input_ids"]) != example["input_ids"]:
        raise ValueError(
            "apply_chat_template(tokenize=True) and encode_chat give different token ids for this conversation; "
            "the masks cannot be compared position by position"
        )
    mask = rendered["assistant_masks"]
    return [t for t, label in enumerate(example["labels"]) if (label != -100) != bool(mask[t])]
