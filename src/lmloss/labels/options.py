"""The encoders' option vocabularies and the checks they share.

Every encoder validates its options here, once, before reading any sample, so a
bad option is reported as itself and not as a failure of sample 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from lmloss._validation import check_choice, check_int

__all__ = [
    "CHAT_MODES",
    "KNOWN_ROLES",
    "ChatMode",
    "CommonOptions",
    "OnEmpty",
    "TruncationSide",
    "check_flag",
    "check_token_id_set",
    "common_options",
    "preview",
    "resolve_mode",
]


ChatMode = Literal["assistant", "all", "last_assistant", "everything"]
OnEmpty = Literal["warn", "drop", "error"]
TruncationSide = Literal["right", "left"]

#: The values of ``mode`` in :func:`encode_chat`.
CHAT_MODES: tuple[str, ...] = ("assistant", "all", "last_assistant", "everything")
#: Message roles :func:`encode_chat` accepts.
# "ipython" (Llama 3.1 tool output) and "function" (OpenAI's legacy tool role) are tool turns.
KNOWN_ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool", "ipython", "function")
_TRUNCATION_SIDES = ("right", "left")


@dataclass(frozen=True)
class CommonOptions:
    """Options shared by every encoder, validated once."""

    max_length: int | None
    truncation_side: str
    ignore_index: int
    ignore_token_ids: frozenset[int]


def common_options(
    max_length: object, truncation_side: object, ignore_index: object, ignore_token_ids: object
) -> CommonOptions:
    """Check the options every encoder takes and bundle them."""
    if max_length is not None:
        max_length = check_int("max_length", max_length)
        if max_length < 1:
            raise ValueError(f"max_length must be None or an int >= 1, got {max_length}")
    check_choice("truncation_side", truncation_side, _TRUNCATION_SIDES)
    ignore_index = check_int("ignore_index", ignore_index)
    return CommonOptions(
        max_length=max_length,
        truncation_side=truncation_side,  # type: ignore[arg-type]  # check_choice passed; mypy cannot narrow object
        ignore_index=ignore_index,
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


def check_flag(name: str, value: object, *, optional: bool = False) -> None:
    """``value`` must be a bool (or ``None`` when ``optional``)."""
    if optional and value is None:
        return
    if not isinstance(value, bool):
        kind = "a bool or None" if optional else "a bool"
        raise TypeError(f"{name} must be {kind}, got {value!r}")


def resolve_mode(mode: object, mask_history: object, train_on_prompt: object) -> str:
    """Map LLaMA-Factory's ``mask_history``/``train_on_prompt`` flags onto ``mode``.

    ``mask_history=True`` is ``mode="last_assistant"``, ``train_on_prompt=True`` is
    ``mode="everything"``; an explicit mode other than the default ``"assistant"``
    that says something else is a contradiction, not a preference.
    """
    check_choice("mode", mode, CHAT_MODES)
    check_flag("mask_history", mask_history, optional=True)
    check_flag("train_on_prompt", train_on_prompt, optional=True)
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
    return mode  # type: ignore[return-value]  # mode was checked by check_choice before this function


def preview(value: object, width: int = 60) -> str:
    """``repr(value)`` cut to ``width`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
