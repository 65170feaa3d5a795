"""Real, small tokenizers built locally for the tests (no hub downloads).

One byte-level BPE model (GPT-2/Qwen-style pre-tokenization) is trained with the
``tokenizers`` library on a few dozen sentences, then wrapped in
``transformers.PreTrainedTokenizerFast`` three times, each with its own chat
template and special-token roles:

- ``build_chatml_tokenizer()``: Qwen2.5-Instruct-like ChatML. eos ``<|im_end|>``,
  pad ``<|endoftext|>``; a default system prompt when the conversation has none.
  Its assistant turns are wrapped in ``{% generation %}`` so transformers can
  compute its own assistant mask (an independent oracle for the tests).
- ``build_llama3_tokenizer()``: Llama-3-like headers. bos ``<|begin_of_text|>``,
  eos ``<|end_of_text|>`` (which the template never emits: turns end with
  ``<|eot_id|>``), contents are ``trim``-med by the template, as Llama 3 does.
- ``build_plain_tokenizer()``: an Alpaca/Vicuna-like template written in plain
  text (``### Assistant: ``) whose trailing space merges with the reply's first
  word under BPE; eos == pad == ``<|endoftext|>`` (GPT-2 style fine-tunes).

Building everything takes a few tens of milliseconds; results are cached, and each
builder returns a fresh wrapper so a test may mutate its tokenizer.
"""

from __future__ import annotations

import functools

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

# A few dozen sentences: enough merges for real multi-character tokens (" the",
# " capital", "\n\n", "###", ...), small enough to train in milliseconds.
_CORPUS = [
    "You are a helpful assistant.",
    "You are a concise geography tutor.",
    "What is the capital of France?",
    "The capital of France is Paris.",
    "And the capital of Italy?",
    "The capital of Italy is Rome.",
    "Paris is a city in France, and Rome is a city in Italy.",
    "Sure thing! Here is the answer you asked for.",
    "Sure, I can help with that question.",
    "Thanks, that is helpful.",
    "Describe the image in one sentence.",
    "The image shows a cat sitting on a red chair.",
    "A small dog runs in the park with a ball.",
    "Hello there, how are you today?",
    "I am fine, thank you for asking.",
    "Please write a short poem about the sea.",
    "The sea is wide, the sea is deep, the waves roll on and never sleep.",
    "Translate the word cat into French.",
    "The French word for cat is chat.",
    "Count from one to five: one, two, three, four, five.",
    "def add(a, b):\n    return a + b\n",
    "### User: What is two plus two?\n### Assistant: Two plus two is four.\n",
    "### User: Name a color.\n### Assistant: Blue is a color.\n",
    "system\nuser\nassistant\n\nThe answer is yes.\n\nThe answer is no.\n",
    "Line one.\n\nLine two.\n\n\nLine three.",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 1, 2, 3, 10, 42, 100, 2024.",
    "Questions and answers help the model learn to talk.",
    "Training on the prompt teaches the model to write prompts.",
    "Masking the history trains only the last reply.",
    "The end of the turn is a token the model must learn.",
    "Images are placeholders that the model should never predict.",
    "Question\n\nAnswer\n\nSure thing, I am sure.",
    "Notes\n\nfirst\n\nsecond\n\nthird",
    "I am Sure it is. Sure thing. Sure, Sure, Sure: yes, Sure.",
]

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)

PLAIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\\n\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '### User: ' + message['content'] + '\\n' -}}"
    "{%- else -%}{{- '### Assistant: ' + message['content'] + eos_token + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Assistant: ' -}}{%- endif -%}"
)


@functools.cache
def _trained_bpe_json() -> str:
    """The trained byte-level BPE, serialized (so each wrapper gets its own copy)."""
    tokenizer = Tokenizer(models.BPE())
    # Qwen2's pre-tokenization: its split regex, then bytes mapped to printable
    # characters; offsets are not trimmed (as in Qwen2's tokenizer.json). The regex
    # lets a run of newlines be one token and a letter run absorb one leading
    # non-letter (" Sure", ":Sure"), which is what makes template text and content
    # merge across their boundary.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=450,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer.to_str()


def _wrap(chat_template: str, *, prepend: str | None = None, **special_tokens: str) -> PreTrainedTokenizerFast:
    backend = Tokenizer.from_str(_trained_bpe_json())
    if prepend is not None:
        # Like Llama 3: encoding with add_special_tokens=True puts a BOS first.
        bos_id = backend.token_to_id(prepend)
        backend.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{prepend} $A", pair=f"{prepend} $A {prepend} $B", special_tokens=[(prepend, bos_id)]
                ),
            ]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)
    tokenizer.chat_template = chat_template
    return tokenizer


def build_chatml_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2.5-Instruct-like: ChatML template, eos ``<|im_end|>``, pad ``<|endoftext|>``."""
    return _wrap(CHATML_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build_llama3_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-3-like headers; bos ``<|begin_of_text|>``, eos ``<|end_of_text|>`` (not emitted)."""
    return _wrap(
        LLAMA3_TEMPLATE,
        prepend="<|begin_of_text|>",
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
    )


def build_plain_tokenizer() -> PreTrainedTokenizerFast:
    """Plain-text ``### User:``/``### Assistant:`` template; eos == pad == ``<|endoftext|>``."""
    return _wrap(PLAIN_TEMPLATE, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
