"""``encode_chat``: a conversation, rendered by its chat template, labelled turn by turn."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lmloss.labels.example import Example, finish_example
from lmloss.labels.options import (
    KNOWN_ROLES,
    ChatMode,
    TruncationSide,
    check_flag,
    common_options,
    preview,
    resolve_mode,
)
from lmloss.labels.render import Renderer, describe_conversation
from lmloss.labels.spans import trained_spans
from lmloss.labels.tokens import window_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["encode_chat"]


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
    character offsets (see :mod:`lmloss.labels`), never by searching token ids.

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
    mode = resolve_mode(mode, mask_history, train_on_prompt)  # type: ignore[assignment]  # a checked mode
    options = common_options(max_length, truncation_side, ignore_index, ignore_token_ids)
    messages = _none_content_as_empty(messages)
    _check_messages(messages, mode)
    renderer = Renderer(tokenizer, messages, tools, chat_template_kwargs)
    if mode != "everything":
        check_flag("train_turn_suffix", train_turn_suffix)
    spans = None if mode == "everything" else trained_spans(renderer, mode, turn_suffix=train_turn_suffix)
    ids, trained = window_tokens(tokenizer, renderer.full, spans, options)
    return finish_example(ids, trained, options)


def _none_content_as_empty(messages: Any) -> Any:
    """OpenAI-style tool-call turns carry ``"content": None`` (only those: elsewhere None is
    an error); templates treat it like ``""``
    (both falsy), and so does the labelling (which needs a string to locate)."""
    if not isinstance(messages, (list, tuple)):
        return messages
    return [
        dict(m, content="") if isinstance(m, Mapping) and m.get("content", "") is None and m.get("tool_calls") else m
        for m in messages
    ]


def _check_messages(messages: object, mode: str) -> None:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {preview(messages)}")
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {preview(message)}")
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
                f"messages[{i}]['content'] must be a str, got {preview(content)}; use '' for a turn "
                f"with only tool_calls, and write images as their placeholder text"
            )
    roles = [m["role"] for m in messages]
    if mode in ("assistant", "last_assistant") and "assistant" not in roles:
        raise ValueError(
            f"the conversation {describe_conversation(messages)} has no assistant turn, so mode={mode!r} would train "
            f"nothing; add an assistant reply, drop the sample, or use mode='all' or 'everything'"
        )
