"""Cross-checking :func:`encode_chat`'s labels with a template's own ``{% generation %}`` assistant mask."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lmloss.labels.chat import encode_chat
from lmloss.labels.render import check_template_kwargs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["template_mask_mismatches"]


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
    kwargs = check_template_kwargs(chat_template_kwargs)
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
