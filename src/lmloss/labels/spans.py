"""The character spans of a rendered conversation that a mode trains (``train_turn_suffix`` included)."""

from __future__ import annotations

from lmloss.labels.content import content_span, empty_content_start
from lmloss.labels.render import Renderer

__all__ = ["trained_spans"]


def trained_spans(renderer: Renderer, mode: str, *, turn_suffix: bool = False) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of ``renderer.full`` whose tokens are trained."""
    roles = [m["role"] for m in renderer.messages]
    assistant = [i for i, role in enumerate(roles) if role == "assistant"]
    if mode == "last_assistant":
        assistant = assistant[-1:]
    spans: list[tuple[int, int] | None] = [_assistant_span(renderer, i, turn_suffix) for i in assistant]
    if mode == "all":
        spans += [content_span(renderer, i) for i, role in enumerate(roles) if role != "assistant"]
    return sorted(span for span in spans if span is not None and span[0] < span[1])


def _assistant_span(renderer: Renderer, i: int, turn_suffix: bool = False) -> tuple[int, int]:
    """Assistant turn ``i``: from the end of the generation prompt to its end-of-turn marker
    (``turn_suffix``: to the end of the turn, the whitespace after the marker included)."""
    turn_start, turn_end = renderer.end(i), renderer.end(i + 1)
    # messages[:0] cannot be rendered (empty conversation), so a conversation that
    # opens with the assistant has no generation prompt to measure.
    start = renderer.end(i, generation_prompt=True) if i > 0 else turn_start
    if start == turn_start:
        # No generation prompt (the template ignores add_generation_prompt, or its
        # assistant turns have no header): the reply starts where its content does.
        content = content_span(renderer, i)
        start = content[0] if content is not None else empty_content_start(renderer, i)
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
