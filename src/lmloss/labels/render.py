"""Rendering one conversation turn by turn with its chat template.

Turn boundaries are where the renderings of ``messages[:k]`` end inside the rendering of
the whole conversation; :class:`Renderer` computes them and refuses templates whose
renderings of the first turns are not prefixes of the whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lmloss.labels.options import preview

__all__ = ["Renderer", "check_template_kwargs", "describe_conversation"]


# apply_chat_template arguments that encode_chat sets itself.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation", "tools", "tokenize", "add_generation_prompt", "continue_final_message",
        "return_dict", "return_assistant_tokens_mask", "padding", "truncation", "max_length",
        "return_tensors", "tokenizer_kwargs",
    }
)  # fmt: skip


def describe_conversation(messages: Sequence[Mapping[str, Any]]) -> str:
    """A short name for a conversation in error messages: its roles and first words."""
    roles = ", ".join(m["role"] for m in messages)
    return f"(roles: {roles}; first message: {preview(messages[0]['content'], 40)})"


class Renderer:
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
        self.kwargs = check_template_kwargs(kwargs)
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
                f"{describe_conversation(self.messages)} (lmloss renders conversations turn by turn to find "
                f"turns): {err}"
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
        raise TypeError(f"encode_chat needs a transformers tokenizer, got {preview(tokenizer)}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template: set tokenizer.chat_template to a Jinja template "
            "(e.g. the 'chat_template' of the instruct model's tokenizer_config.json), or encode "
            "prompt/completion pairs with encode_prompt_completion"
        )


def check_template_kwargs(kwargs: object) -> dict[str, Any]:
    """``chat_template_kwargs`` as a dict (``{}`` for ``None``), refusing the arguments encode_chat sets."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"chat_template_kwargs must be a dict with str keys, got {preview(kwargs)}")
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {reserved}: encode_chat sets them itself")
    return dict(kwargs)
