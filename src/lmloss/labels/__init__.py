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

The modules, each importing only those above it:

* ``options``: option vocabularies (``CHAT_MODES``, ``KNOWN_ROLES``) and shared checks;
* ``example``: :class:`Example`, labels from per-token trained flags, truncation;
* ``render``: rendering a conversation turn by turn, turn boundaries;
* ``content``: where a message's content lies in its turn (rendered markers);
* ``spans``: the character spans a mode trains;
* ``tokens``: spans to tokens, and the window a long text is tokenized in;
* ``chat``, ``pairs``, ``dataset``: :func:`encode_chat`, :func:`encode_prompt_completion`,
  :func:`encode_dataset`;
* ``masking``: :func:`mask_token_ids`; ``crosscheck``: :func:`template_mask_mismatches`.
"""

# OnEmpty, TruncationSide and check_token_id_set are public though not in __all__, as
# before labels became a package: the encoders' option types and lmloss.check's id check.
from lmloss.labels.chat import encode_chat
from lmloss.labels.crosscheck import template_mask_mismatches
from lmloss.labels.dataset import DatasetReport, EncodedDataset, NoTargetWarning, encode_dataset
from lmloss.labels.example import Example
from lmloss.labels.masking import mask_token_ids
from lmloss.labels.options import CHAT_MODES, KNOWN_ROLES, ChatMode
from lmloss.labels.options import OnEmpty as OnEmpty
from lmloss.labels.options import TruncationSide as TruncationSide
from lmloss.labels.options import check_token_id_set as check_token_id_set
from lmloss.labels.pairs import encode_prompt_completion

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
