"""Where a message's content lies inside its rendered turn, found by rendering markers in its place."""

from __future__ import annotations

from lmloss.labels.render import Renderer

__all__ = ["content_span", "empty_content_start"]


def content_span(renderer: Renderer, i: int) -> tuple[int, int] | None:
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


def _content_by_marker(renderer: Renderer, i: int, turn: str) -> tuple[int, int] | None:
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


def empty_content_start(renderer: Renderer, i: int) -> int:
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


def _pick_content(renderer: Renderer, i: int, turn: str, text: str, hits: list[int]) -> int:
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


def _turn_with_content(renderer: Renderer, i: int, content: str) -> str | None:
    """The text of turn ``i`` rendered with another content (``None`` if that changes earlier turns)."""
    prefix = renderer.full[: renderer.end(i)]
    rendered = renderer.render([*renderer.messages[:i], dict(renderer.messages[i], content=content)])
    return rendered[len(prefix) :] if rendered.startswith(prefix) else None
