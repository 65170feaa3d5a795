"""Built-in data, tokenizer and model: a whole training run with nothing downloaded.

- ``builtin_conversations()``: 400 multi-turn chats (capitals, colours, animal
  sounds, opposites, small sums, thanks) in the ``{"messages": [...]}`` format.
- ``build_tokenizer(texts)``: a byte-level BPE trained on ``texts`` in a second,
  wrapped as a transformers tokenizer with a Qwen-style ChatML template whose
  ``{% generation %}`` markers enclose what lmloss trains.
- ``build_model(vocab_size, size)``: a randomly initialised Qwen2 causal LM from a
  small config.

transformers and tokenizers are imported inside the functions (the ``hf`` extra).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from typing import Any

__all__ = ["CHATML_TEMPLATE", "MODEL_SIZES", "build_model", "build_tokenizer", "builtin_conversations"]

# Qwen2-style ChatML, without Qwen's default system prompt (the data brings its own).
# ``{% generation %}`` marks exactly what lmloss trains in an assistant turn (its content
# and ``<|im_end|>``, not the header nor the newline after), so transformers'
# ``return_assistant_tokens_mask`` and TRL's ``assistant_only_loss`` agree with lmloss's
# labels. The markers change nothing in the rendered text.
CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}{% generation %}{{- m['content'] + '<|im_end|>' -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen2 architecture, scaled down: "tiny" trains in seconds, "small" in minutes on a CPU.
# Keyword arguments of Qwen2Config (typed Any: the config takes values of many types).
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "small": dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    ),
}


def builtin_conversations() -> list[dict[str, Any]]:
    """The built-in SFT data set: a list of ``{"messages": [{"role", "content"}, ...]}``."""
    text = resources.files("lmloss.train").joinpath("data/chat.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def build_tokenizer(texts: Iterable[str], *, vocab_size: int = 512, split_digits: bool = False) -> Any:
    """A ``PreTrainedTokenizerFast`` (byte-level BPE trained on ``texts``, ChatML template).

    eos is ``<|im_end|>`` (the end of every turn, so generation stops there) and pad
    is ``<|endoftext|>``. ``split_digits``: every digit is its own token, as in Qwen2's
    tokenizer (what ``lmloss.grounding`` needs to read numbers digit by digit).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size must be an int >= 300 (256 bytes + specials + merges), got {vocab_size!r}")
    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, size: str = "tiny", *, max_positions: int = 512) -> Any:
    """A randomly initialised ``Qwen2ForCausalLM`` of one of ``MODEL_SIZES`` (tied embeddings)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    config = Qwen2Config(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        use_cache=False,
        **MODEL_SIZES[size],
    )
    return Qwen2ForCausalLM(config)
