"""Tests of lmloss.labels on real tokenizers built locally (tests/_tokenizers.py).

The expected labels are written by hand as text: the trained tokens are decoded,
run by run, and compared with the exact strings a reader can check against the
chat template. An independent oracle (transformers' own assistant mask from a
``{% generation %}`` template) and a second implementation of the token mapping
(the no-offsets fallback, run on the same tokenizers) back them up.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import ByT5Tokenizer

import lmloss
from _tokenizers import CHATML_TEMPLATE, build_chatml_tokenizer, build_plain_tokenizer
from lmloss.labels import (
    CHAT_MODES,
    DatasetReport,
    EncodedDataset,
    NoTargetWarning,
    encode_chat,
    encode_dataset,
    encode_prompt_completion,
    mask_token_ids,
)

IGNORE = -100

CONVERSATION = [
    {"role": "system", "content": "You are a concise geography tutor."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def trained_runs(example, tokenizer) -> list[str]:
    """The decoded text of each maximal run of consecutive target positions."""
    runs, run = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE:
            assert label == token  # labels are unshifted: a target is the token itself
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    if run:
        runs.append(tokenizer.decode(run))
    return runs


def contains_run(haystack: list[int], needle: list[int]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


class NoOffsets:
    """A real tokenizer seen through an interface without offsets (like a Python tokenizer)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, text, **kwargs):
        kwargs.pop("return_offsets_mapping", None)
        return self._tokenizer(text, **kwargs)


# ------------------------------------------------------------- modes, hand-checked

EXPECTED_RUNS = {
    ("chatml_tokenizer", "assistant"): ["The capital of France is Paris.<|im_end|>", "Rome.<|im_end|>"],
    ("chatml_tokenizer", "all"): [
        "You are a concise geography tutor.",
        "What is the capital of France?",
        "The capital of France is Paris.<|im_end|>",
        "And Italy?",
        "Rome.<|im_end|>",
    ],
    ("chatml_tokenizer", "last_assistant"): ["Rome.<|im_end|>"],
    ("chatml_tokenizer", "everything"): [
        (
            "<|im_start|>system\nYou are a concise geography tutor.<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n"
            "<|im_start|>user\nAnd Italy?<|im_end|>\n"
            "<|im_start|>assistant\nRome.<|im_end|>\n"
        )
    ],
    ("llama3_tokenizer", "assistant"): ["The capital of France is Paris.<|eot_id|>", "Rome.<|eot_id|>"],
    ("llama3_tokenizer", "all"): [
        "You are a concise geography tutor.",
        "What is the capital of France?",
        "The capital of France is Paris.<|eot_id|>",
        "And Italy?",
        "Rome.<|eot_id|>",
    ],
    ("llama3_tokenizer", "last_assistant"): ["Rome.<|eot_id|>"],
    ("llama3_tokenizer", "everything"): [
        (
            "<|begin_of_text|>"
            "<|start_header_id|>system<|end_header_id|>\n\nYou are a concise geography tutor.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nThe capital of France is Paris.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nAnd Italy?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nRome.<|eot_id|>"
        )
    ],
    # The plain template's generation prompt ends with a space. BPE merges it with
    # "Rome" (" Rome" is in the vocabulary) but not with "The" (" The" is not), so
    # the second reply's run starts with the space that its first token carries.
    ("plain_tokenizer", "assistant"): ["The capital of France is Paris.<|endoftext|>", " Rome.<|endoftext|>"],
    ("plain_tokenizer", "all"): [
        # "." and the template's "\n\n" are one token (".\n\n"); it carries content.
        "You are a concise geography tutor.\n\n",
        "What is the capital of France?",
        "The capital of France is Paris.<|endoftext|>",
        "And Italy?",
        " Rome.<|endoftext|>",
    ],
    ("plain_tokenizer", "last_assistant"): [" Rome.<|endoftext|>"],
    ("plain_tokenizer", "everything"): [
        (
            "You are a concise geography tutor.\n\n"
            "### User: What is the capital of France?\n"
            "### Assistant: The capital of France is Paris.<|endoftext|>\n"
            "### User: And Italy?\n"
            "### Assistant: Rome.<|endoftext|>\n"
        )
    ],
}


@pytest.mark.parametrize("tokenizer_name, mode", sorted(EXPECTED_RUNS))
def test_modes_train_exactly_the_expected_text(request, tokenizer_name, mode):
    tokenizer = request.getfixturevalue(tokenizer_name)
    example = encode_chat(CONVERSATION, tokenizer, mode=mode)
    assert trained_runs(example, tokenizer) == EXPECTED_RUNS[tokenizer_name, mode]


@pytest.mark.parametrize("tokenizer_name", ["chatml_tokenizer", "llama3_tokenizer", "plain_tokenizer"])
@pytest.mark.parametrize("mode", CHAT_MODES)
def test_input_ids_are_those_of_apply_chat_template(request, tokenizer_name, mode):
    tokenizer = request.getfixturevalue(tokenizer_name)
    example = encode_chat(CONVERSATION, tokenizer, mode=mode)
    reference = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert example["input_ids"] == list(reference)
    assert len(example["labels"]) == len(example["input_ids"])
    assert set(example) == {"input_ids", "labels"}  # no attention_mask: collators make it


def test_default_system_prompt_of_the_template_is_scaffolding_in_all_mode(chatml_tokenizer):
    # The ChatML template adds "You are a helpful assistant." when there is no
    # system message: it is not a message's content, so mode="all" does not train it.
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hello"}]
    example = encode_chat(messages, chatml_tokenizer, mode="all")
    assert "You are a helpful assistant." in chatml_tokenizer.decode(example["input_ids"])
    assert trained_runs(example, chatml_tokenizer) == ["Hello there", "Hello<|im_end|>"]


ORACLE_CONVERSATIONS = [
    CONVERSATION,
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure thing"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\nSure thing"}],
    [
        {"role": "user", "content": "Count"},
        {"role": "assistant", "content": "one, two"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "three.\n\n"},
    ],
]


@pytest.mark.parametrize("messages", ORACLE_CONVERSATIONS)
def test_assistant_mode_matches_transformers_generation_mask(chatml_tokenizer, messages):
    # Independent oracle: the ChatML template wraps "content + <|im_end|>" of each
    # assistant turn in {% generation %}, from which transformers builds its own mask.
    oracle = chatml_tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    example = encode_chat(messages, chatml_tokenizer)
    assert example["input_ids"] == list(oracle["input_ids"])
    assert [int(label != IGNORE) for label in example["labels"]] == list(oracle["assistant_masks"])


# --------------------------------------- the template tokenizes differently in context


def test_plain_template_space_merges_with_reply(plain_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure thing"}]
    example = encode_chat(messages, plain_tokenizer)
    # The response template on its own ends with a lone " " token; in context that
    # space is part of " Sure". Searching for the template's ids finds nothing.
    template_ids = plain_tokenizer("### Assistant: ", add_special_tokens=False)["input_ids"]
    assert not contains_run(example["input_ids"], template_ids)
    assert trained_runs(example, plain_tokenizer) == [" Sure thing<|endoftext|>"]


def test_chatml_newline_merges_with_reply(chatml_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\nSure thing"}]
    example = encode_chat(messages, chatml_tokenizer)
    # "assistant\n" + "\nSure": the two newlines are one token, so the template's
    # ids ("...assistant", "\n") are not in the conversation's ids.
    template_ids = chatml_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert not contains_run(example["input_ids"], template_ids)
    assert trained_runs(example, chatml_tokenizer) == ["\n\nSure thing<|im_end|>"]


# ------------------------------------------------------------- end of turn and EOS


def test_llama3_end_of_turn_is_a_target_although_it_is_not_eos(llama3_tokenizer):
    example = encode_chat(CONVERSATION, llama3_tokenizer)
    eot = llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot != llama3_tokenizer.eos_token_id
    assert llama3_tokenizer.eos_token_id not in example["input_ids"]  # the template never emits eos
    assert example["labels"].count(eot) == 2  # both assistant turns end with a target <|eot_id|>
    assert example["input_ids"].count(eot) == 5


def test_llama3_trimmed_content_is_located(llama3_tokenizer):
    messages = [{"role": "user", "content": "  And Italy?\n"}, {"role": "assistant", "content": " Rome.  "}]
    example = encode_chat(messages, llama3_tokenizer, mode="all")
    assert trained_runs(example, llama3_tokenizer) == ["And Italy?", "Rome.<|eot_id|>"]


def test_chat_eos_is_a_target_when_pad_equals_eos(plain_tokenizer):
    assert plain_tokenizer.pad_token_id == plain_tokenizer.eos_token_id
    example = encode_chat(CONVERSATION, plain_tokenizer, mode="last_assistant")
    eos = plain_tokenizer.eos_token_id
    assert example["labels"].count(eos) == 1
    # The pitfall this avoids: masking by pad id would remove that target.
    naive = [
        IGNORE if t == plain_tokenizer.pad_token_id else label
        for t, label in zip(example["input_ids"], example["labels"], strict=True)
    ]
    assert naive.count(eos) == 0


def test_prompt_completion_eos_is_a_target_when_pad_equals_eos(plain_tokenizer):
    example = encode_prompt_completion("### User: Hi\n### Assistant:", " Sure thing", plain_tokenizer)
    eos = plain_tokenizer.eos_token_id
    assert eos == plain_tokenizer.pad_token_id
    assert example["input_ids"][-1] == eos and example["labels"][-1] == eos
    assert plain_tokenizer.decode([t for t in example["labels"] if t != IGNORE]) == " Sure thing<|endoftext|>"


def test_targets_reach_the_loss_at_the_right_positions(plain_tokenizer):
    # Unshifted labels + causal_lm_loss(shift=True): the loss of target t (stored at
    # position t by reduction="none") is nonzero exactly where labels[t] is a target.
    example = encode_prompt_completion("### User: Hi\n### Assistant:", " Sure thing", plain_tokenizer)
    labels = torch.tensor([example["labels"]])
    logits = torch.randn(1, labels.shape[1], len(plain_tokenizer), generator=torch.Generator().manual_seed(0))
    per_token = lmloss.causal_lm_loss(logits, labels, reduction="none")
    scored = (per_token[0] != 0).tolist()
    assert scored == [t != IGNORE for t in [IGNORE, *example["labels"][1:]]]
    assert scored[-1]  # the EOS is scored


# ---------------------------------------------------------------- prompt/completion


def test_prompt_completion_strings_put_bos_first_and_nowhere_else(llama3_tokenizer):
    tok = llama3_tokenizer
    example = encode_prompt_completion("What is the capital of France?", " Paris.", tok)
    prompt_ids = tok("What is the capital of France?", add_special_tokens=False)["input_ids"]
    completion_ids = tok(" Paris.", add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == [tok.bos_token_id, *prompt_ids, *completion_ids, tok.eos_token_id]
    assert example["labels"] == [IGNORE] * (1 + len(prompt_ids)) + [*completion_ids, tok.eos_token_id]


def test_prompt_completion_trailing_special_tokens_are_not_put_between():
    # ByT5 appends </s> when adding special tokens; it must not land between prompt
    # and completion, and the completion gets exactly one EOS.
    tok = ByT5Tokenizer(extra_ids=0)
    example = encode_prompt_completion("Hi", " there", tok)
    assert example["input_ids"] == [*(x + 3 for x in b"Hi"), *(x + 3 for x in b" there"), 1]
    assert example["labels"] == [IGNORE, IGNORE, *(x + 3 for x in b" there"), 1]


def test_prompt_completion_with_id_lists():
    example = encode_prompt_completion([5, 6, 7], [8, 9], eos_token_id=2)
    assert example == {"input_ids": [5, 6, 7, 8, 9, 2], "labels": [IGNORE, IGNORE, IGNORE, 8, 9, 2]}
    # A completion that already ends with the EOS does not get a second one.
    assert encode_prompt_completion([5], (8, 2), eos_token_id=2)["input_ids"] == [5, 8, 2]
    assert encode_prompt_completion([5], [8], add_eos=False) == {"input_ids": [5, 8], "labels": [IGNORE, 8]}
    trained = encode_prompt_completion([5, 6], [8], eos_token_id=2, train_on_prompt=True)
    assert trained["labels"] == trained["input_ids"] == [5, 6, 8, 2]


def test_prompt_completion_eos_from_tokenizer(chatml_tokenizer):
    example = encode_prompt_completion([1, 2], [3], chatml_tokenizer)
    assert example["input_ids"][-1] == chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert example["labels"][-1] == example["input_ids"][-1]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prompt="Hi", completion=[1]), TypeError, "tokenizer is needed"),
        (dict(prompt=[1, -2], completion=[1], eos_token_id=2), TypeError, "list of int token ids"),
        (dict(prompt=[1, True], completion=[1], eos_token_id=2), TypeError, "list of int token ids"),
        (dict(prompt=3, completion=[1], eos_token_id=2), TypeError, "prompt must be a str"),
        (dict(prompt=[1], completion=[2]), ValueError, "eos_token_id"),
        (dict(prompt=[1], completion=[2], eos_token_id="2"), TypeError, "eos_token_id"),
        (dict(prompt=[1], completion=[2], add_eos=1), TypeError, "add_eos"),
        (dict(prompt=[1], completion=[2], add_eos=False, max_length=0), ValueError, "max_length"),
        (dict(prompt=[1], completion=[2], add_eos=False, truncation_side="middle"), ValueError, "truncation_side"),
        (
            dict(prompt=[1], completion=[2], add_eos=False, ignore_token_ids="<|image_pad|>"),
            TypeError,
            "ignore_token_ids",
        ),
        (dict(prompt=[1], completion=[2], add_eos=False, ignore_index=2), ValueError, "negative ignore_index"),
    ],
)
def test_prompt_completion_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        encode_prompt_completion(**kwargs)


# -------------------------------------------------------------------- placeholders


IMAGE_CONVERSATION = [
    {"role": "user", "content": "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Describe the image."},
    {"role": "assistant", "content": "The image shows a cat.<|image_pad|>"},
    {"role": "user", "content": "<|vision_start|><|video_pad|><|vision_end|>And this?"},
    {"role": "assistant", "content": "A dog."},
]


@pytest.mark.parametrize("mode", CHAT_MODES)
def test_placeholder_ids_are_never_targets(chatml_tokenizer, mode):
    pads = chatml_tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    example = encode_chat(IMAGE_CONVERSATION, chatml_tokenizer, mode=mode, ignore_token_ids=pads)
    plain = encode_chat(IMAGE_CONVERSATION, chatml_tokenizer, mode=mode)
    assert sum(example["input_ids"].count(p) for p in pads) == 4
    assert not set(pads) & set(example["labels"])
    # Only the placeholders changed.
    assert example["labels"] == mask_token_ids(plain["labels"], pads)


def test_placeholder_inside_assistant_reply_is_cut_out_of_the_run(chatml_tokenizer):
    pad = chatml_tokenizer.convert_tokens_to_ids("<|image_pad|>")
    example = encode_chat(IMAGE_CONVERSATION, chatml_tokenizer, ignore_token_ids=[pad])
    assert trained_runs(example, chatml_tokenizer) == ["The image shows a cat.", "<|im_end|>", "A dog.<|im_end|>"]


def test_mask_token_ids_on_lists_and_tensors():
    labels = [IGNORE, 5, 7, 5, 9]
    assert mask_token_ids(labels, [5]) == [IGNORE, IGNORE, 7, IGNORE, 9]
    assert labels == [IGNORE, 5, 7, 5, 9]  # not modified
    assert mask_token_ids([[5, 1], [2, 5]], {5}, ignore_index=-1) == [[-1, 1], [2, -1]]
    for dtype in (torch.long, torch.int32):
        batch = torch.tensor([[IGNORE, 5, 7], [5, 9, 7]], dtype=dtype)
        out = mask_token_ids(batch, (5, 7))
        assert out.dtype == dtype
        assert out.tolist() == [[IGNORE] * 3, [IGNORE, 9, IGNORE]]
        assert batch[0, 1] == 5  # not modified
        assert mask_token_ids(batch, []).tolist() == batch.tolist()


@pytest.mark.parametrize(
    "labels, token_ids, error",
    [
        (torch.ones(3), [1], ValueError),
        (torch.ones(3, dtype=torch.bool), [1], ValueError),
        ((1, 2), [1], TypeError),
        ([1, "2"], [1], TypeError),
        ([1, 2], 1, TypeError),
        ([1, 2], ["<|image_pad|>"], TypeError),
    ],
)
def test_mask_token_ids_bad_input(labels, token_ids, error):
    with pytest.raises(error):
        mask_token_ids(labels, token_ids)


# -------------------------------------------------------------------- other templates


def _fresh(builder, template):
    tokenizer = builder()
    tokenizer.chat_template = template
    return tokenizer


# Drops the reasoning of assistant turns that are not the last one, as Qwen3's
# template does: the rendering of a prefix is then not a prefix of the whole.
REWRITING_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' and not loop.last -%}"
    "{{- '<|im_start|>assistant\\n' + m['content'].split('</think>')[-1].lstrip() + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Mistral-like: no generation prompt, the reply follows "[/INST]" directly.
NO_GENERATION_PROMPT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '[INST] ' + m['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- ' ' + m['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)


def test_template_that_rewrites_history_is_refused_with_a_clear_error():
    tokenizer = _fresh(build_chatml_tokenizer, REWRITING_TEMPLATE)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>easy</think> Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "<think>sad</think> Goodbye"},
    ]
    with pytest.raises(ValueError, match="not a prefix of the whole conversation's rendering"):
        encode_chat(messages, tokenizer)
    # The last turn alone, or every token, needs no history.
    last = encode_chat(messages, tokenizer, mode="last_assistant")
    assert trained_runs(last, tokenizer) == ["<think>sad</think> Goodbye<|im_end|>"]
    assert all(label != IGNORE for label in encode_chat(messages, tokenizer, mode="everything")["labels"])


def test_template_without_generation_prompt():
    tokenizer = _fresh(build_plain_tokenizer, NO_GENERATION_PROMPT_TEMPLATE)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Sure thing"},
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "Rome."},
    ]
    example = encode_chat(messages, tokenizer)
    # " Sure" and " Rome" are single tokens that start in the template's space: they
    # carry content, so they are targets.
    assert trained_runs(example, tokenizer) == [" Sure thing<|endoftext|>", " Rome.<|endoftext|>"]


# Qwen2.5-like tool use: a tools block, tool calls written by the template, and
# consecutive tool results merged into one user block.
TOOL_TEMPLATE = (
    "{%- if tools -%}{{- '<|im_start|>system\\n# Tools\\n' -}}"
    "{%- for t in tools -%}{{- t | tojson -}}{%- endfor -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'tool' -%}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- elif m.role == 'assistant' and m.tool_calls is defined -%}"
    "{{- '<|im_start|>assistant\\n' + m.content -}}"
    "{%- for c in m.tool_calls -%}{{- '\\n<tool_call>\\n' + (c.function | tojson) + '\\n</tool_call>' -}}{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def test_tool_calls_are_trained_and_merged_tool_results_need_assistant_mode():
    tokenizer = _fresh(build_chatml_tokenizer, TOOL_TEMPLATE)
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "20C"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    example = encode_chat(messages, tokenizer, tools=tools)
    assert "# Tools" in tokenizer.decode(example["input_ids"])  # the tools reached the template
    # The call is the reply; the template's "\n" after "assistant" merges with the
    # call's leading "\n" into one token, which therefore is a target.
    call_text = '\n\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert trained_runs(example, tokenizer) == [call_text, "It is sunny.<|im_end|>"]
    # The first tool result alone renders as a closed block, the whole conversation
    # does not close it: "all" (which needs that turn) refuses.
    with pytest.raises(ValueError, match="not a prefix"):
        encode_chat(messages, tokenizer, tools=tools, mode="all")


def test_tool_call_turn_with_none_content_and_tool_role_aliases():
    """content=None (OpenAI tool calls) encodes as ''; ipython/function turns are tool turns, not trained."""
    tokenizer = _fresh(build_chatml_tokenizer, TOOL_TEMPLATE)
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    base = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    want = encode_chat(base, tokenizer)
    none_content = [dict(m, content=None) if m.get("tool_calls") else m for m in base]
    assert encode_chat(none_content, tokenizer) == want
    for role in ("ipython", "function"):
        renamed = [dict(m, role=role) if m["role"] == "tool" else m for m in base]
        # Trained: the call and the final reply, never the tool's output.
        assert trained_runs(encode_chat(renamed, tokenizer), tokenizer) == trained_runs(want, tokenizer)
    assert trained_runs(want, tokenizer)[-1] == "It is sunny.<|im_end|>" and len(trained_runs(want, tokenizer)) == 2


def test_conversation_that_opens_with_the_assistant(chatml_tokenizer):
    messages = [{"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Hi"}]
    example = encode_chat(messages, chatml_tokenizer)
    assert trained_runs(example, chatml_tokenizer) == ["Hello there<|im_end|>"]


@pytest.mark.parametrize(
    "content, expected",
    # "\n" merges with the newline after "user" into one "\n\n" token, a target.
    [("e", "e"), ("user", "user"), ("im", "im"), ("\n", "\n\n")],
)
def test_content_that_also_occurs_in_the_scaffolding(chatml_tokenizer, content, expected):
    # "e" is in "user" and "<|im_end|>"; "user" is the role name. In mode="all" the
    # content run must be the message's own characters, right before <|im_end|>.
    messages = [
        {"role": "system", "content": "x"},
        {"role": "user", "content": content},
        {"role": "assistant", "content": "ok"},
    ]
    example = encode_chat(messages, chatml_tokenizer, mode="all")
    ids, labels = example["input_ids"], example["labels"]
    im_end = chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    system_end, user_end = [i for i, t in enumerate(ids) if t == im_end][:2]
    user_targets = [i for i in range(system_end + 1, user_end) if labels[i] != IGNORE]
    assert chatml_tokenizer.decode([ids[i] for i in user_targets]) == expected
    assert user_targets == list(range(user_targets[0], user_end))  # one run, up to <|im_end|>


def test_template_that_changes_content_fails_in_all_mode_only():
    tokenizer = _fresh(
        build_chatml_tokenizer,
        CHATML_TEMPLATE.replace("message['content'] + '<|im_end|>\\n'", "message['content'] | upper + '<|im_end|>\\n'"),
    )
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi"}]
    assert trained_runs(encode_chat(messages, tokenizer), tokenizer) == ["Hi<|im_end|>"]
    with pytest.raises(ValueError, match="changes it"):
        encode_chat(messages, tokenizer, mode="all")


# -------------------------------------------------------- tokenizers without offsets


FALLBACK_CONVERSATIONS = [
    *ORACLE_CONVERSATIONS,
    IMAGE_CONVERSATION,
    [{"role": "user", "content": "  And Italy?\n"}, {"role": "assistant", "content": " Rome.  "}],
]


@pytest.mark.parametrize("tokenizer_name", ["chatml_tokenizer", "llama3_tokenizer", "plain_tokenizer"])
@pytest.mark.parametrize("messages", FALLBACK_CONVERSATIONS)
def test_no_offsets_fallback_agrees_with_offsets(request, tokenizer_name, messages):
    tokenizer = request.getfixturevalue(tokenizer_name)
    for mode in ("assistant", "all", "last_assistant"):
        assert encode_chat(messages, NoOffsets(tokenizer), mode=mode) == encode_chat(messages, tokenizer, mode=mode)


def test_python_tokenizer_without_offsets():
    tokenizer = ByT5Tokenizer(extra_ids=0, additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHATML_TEMPLATE
    assert "offset_mapping" not in tokenizer("ab", return_offsets_mapping=True)
    example = encode_chat(CONVERSATION, tokenizer, mode="all")
    assert trained_runs(example, tokenizer) == EXPECTED_RUNS["chatml_tokenizer", "all"]


# ------------------------------------------------------------------------ validation


def test_no_assistant_turn_names_the_conversation(chatml_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    for mode in ("assistant", "last_assistant"):
        with pytest.raises(ValueError, match=r"roles: system, user; first message: 'Be brief\.'.*no assistant turn"):
            encode_chat(messages, chatml_tokenizer, mode=mode)
    assert trained_runs(encode_chat(messages, chatml_tokenizer, mode="all"), chatml_tokenizer) == [
        "Be brief.",
        "Hello?",
    ]


def test_tokenizer_without_chat_template():
    tokenizer = build_chatml_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"no chat template: set tokenizer\.chat_template"):
        encode_chat(CONVERSATION, tokenizer)
    with pytest.raises(TypeError, match="needs a transformers tokenizer"):
        encode_chat(CONVERSATION, None)


@pytest.mark.parametrize(
    "messages, error, match",
    [
        ("hello", TypeError, "messages must be a list"),
        ([], ValueError, "empty"),
        (["hello"], TypeError, r"messages\[0\] must be a dict"),
        ([{"role": 1, "content": "x"}], TypeError, r"\['role'\] must be a str"),
        ([{"content": "x"}], TypeError, r"\['role'\] must be a str"),
        ([{"role": "gpt", "content": "x"}], ValueError, "'gpt' -> 'assistant'"),
        ([{"role": "user", "content": None}], TypeError, r"\['content'\] must be a str"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], TypeError, "placeholder text"),
    ],
)
def test_bad_messages(chatml_tokenizer, messages, error, match):
    with pytest.raises(error, match=match):
        encode_chat(messages, chatml_tokenizer, mode="everything")


def test_llama_factory_aliases(chatml_tokenizer):
    def labels(**kwargs):
        return encode_chat(CONVERSATION, chatml_tokenizer, **kwargs)["labels"]

    assert labels(mask_history=True) == labels(mode="last_assistant") != labels()
    assert labels(train_on_prompt=True) == labels(mode="everything")
    assert labels(mask_history=False, train_on_prompt=False) == labels()
    assert labels(mode="last_assistant", mask_history=True) == labels(mode="last_assistant")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mode="assistant_only"), ValueError, "mode='assistant_only' is not supported"),
        (dict(mode="all", mask_history=True), ValueError, "pass only one"),
        (dict(mode="all", train_on_prompt=True), ValueError, "pass only one"),
        (dict(mode="last_assistant", mask_history=False), ValueError, "contradicts"),
        (dict(mode="everything", train_on_prompt=False), ValueError, "contradicts"),
        (dict(mask_history=True, train_on_prompt=True), ValueError, "contradicts"),
        (dict(mask_history="yes"), TypeError, "mask_history"),
        (dict(chat_template_kwargs={"add_generation_prompt": True}), ValueError, "may not set"),
        (dict(chat_template_kwargs=["x"]), TypeError, "chat_template_kwargs"),
        (dict(max_length=True), TypeError, "max_length"),
        (dict(ignore_token_ids=5), TypeError, "ignore_token_ids"),
        (dict(ignore_token_ids=[-1]), ValueError, "ignore_token_ids"),
        (dict(ignore_token_ids=[1.0]), TypeError, "ignore_token_ids"),
        (dict(ignore_index=None), TypeError, "ignore_index"),
    ],
)
def test_bad_options(chatml_tokenizer, kwargs, error, match):
    with pytest.raises(error, match=match):
        encode_chat(CONVERSATION, chatml_tokenizer, **kwargs)


def test_template_error_is_reported_as_value_error():
    tokenizer = _fresh(build_chatml_tokenizer, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        encode_chat(CONVERSATION, tokenizer)


def test_template_kwargs_reach_the_template():
    tokenizer = _fresh(
        build_chatml_tokenizer, CHATML_TEMPLATE.replace("You are a helpful assistant.", "' + persona + '")
    )
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    example = encode_chat(messages, tokenizer, chat_template_kwargs={"persona": "You are a cat."}, mode="everything")
    assert "You are a cat." in tokenizer.decode(example["input_ids"])


# ------------------------------------------------------------------------- truncation


def test_truncation_right_and_left(chatml_tokenizer):
    full = encode_chat(CONVERSATION, chatml_tokenizer)
    right = encode_chat(CONVERSATION, chatml_tokenizer, max_length=20)
    left = encode_chat(CONVERSATION, chatml_tokenizer, max_length=20, truncation_side="left")
    assert right == {"input_ids": full["input_ids"][:20], "labels": full["labels"][:20]}
    assert left == {"input_ids": full["input_ids"][-20:], "labels": full["labels"][-20:]}
    assert encode_chat(CONVERSATION, chatml_tokenizer, max_length=10_000) == full


LONG_QUESTION = " ".join(["What is the capital of France?"] * 12)


def _dataset():
    return [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "user", "content": LONG_QUESTION}, {"role": "assistant", "content": "Paris."}]},
        {"prompt": "Hi", "completion": " there"},
        {"prompt": LONG_QUESTION, "completion": " Paris."},
        {"messages": CONVERSATION},
    ]


def test_dataset_counts_samples_left_without_target(chatml_tokenizer):
    # Samples 1 and 3 have more than 64 tokens before their first target, the
    # others fewer.
    assert len(chatml_tokenizer(LONG_QUESTION)["input_ids"]) > 64
    with pytest.warns(
        NoTargetWarning,
        match=r"2 of 5 samples have no target after truncation to max_length=64 \(indices 1, 3\); pass on_empty='drop'",
    ):
        examples = encode_dataset(_dataset(), chatml_tokenizer, max_length=64)
    assert isinstance(examples, EncodedDataset) and len(examples) == 5
    assert examples.report == DatasetReport(5, 2, (1, 3), 0, 64)
    assert all(set(ex["labels"]) == {IGNORE} for ex in (examples[1], examples[3]))
    assert all(len(ex["input_ids"]) <= 64 for ex in examples)


def test_dataset_drops_or_raises(chatml_tokenizer):
    with pytest.warns(NoTargetWarning, match=r"2 of 5 samples .* dropped them"):
        dropped = encode_dataset(_dataset(), chatml_tokenizer, max_length=64, on_empty="drop")
    assert len(dropped) == 3 and dropped.report.num_dropped == 2
    kept = encode_dataset(_dataset(), chatml_tokenizer)  # no truncation: every sample has targets
    assert [ex for i, ex in enumerate(kept) if i not in (1, 3)] == [
        encode_dataset([s], chatml_tokenizer)[0] for i, s in enumerate(_dataset()) if i not in (1, 3)
    ]
    with pytest.raises(ValueError, match=r"2 of 5 samples have no target after truncation to max_length=64"):
        encode_dataset(_dataset(), chatml_tokenizer, max_length=64, on_empty="error")


def test_dataset_without_empty_samples_is_silent(chatml_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        examples = encode_dataset(_dataset(), chatml_tokenizer, on_empty="error")
    assert examples.report == DatasetReport(5, 0, (), 0, None)
    assert examples[4] == encode_chat(CONVERSATION, chatml_tokenizer)
    assert examples[2] == encode_prompt_completion("Hi", " there", chatml_tokenizer)


def test_a_target_at_position_zero_does_not_count():
    # The shift leaves position 0 without a prediction: this sample trains nothing.
    samples = [{"prompt": [], "completion": [5]}, {"prompt": [4], "completion": [5]}]
    with pytest.warns(NoTargetWarning, match=r"1 of 2 samples have no target \(no trained token after position 0\)"):
        report = encode_dataset(samples, add_eos=False).report
    assert report.empty_indices == (0,)


def test_dataset_options_reach_the_encoders(chatml_tokenizer):
    samples = [{"messages": CONVERSATION}, {"prompt": [1, 2], "completion": [3]}]
    examples = encode_dataset(samples, chatml_tokenizer, mode="last_assistant", train_on_prompt=None, eos_token_id=9)
    assert examples[0] == encode_chat(CONVERSATION, chatml_tokenizer, mode="last_assistant")
    assert examples[1] == {"input_ids": [1, 2, 3, 9], "labels": [IGNORE, IGNORE, 3, 9]}
    everything = encode_dataset(samples, chatml_tokenizer, train_on_prompt=True, eos_token_id=9)
    assert all(ex["labels"] == ex["input_ids"] for ex in everything)


@pytest.mark.parametrize(
    "samples, error, match",
    [
        (
            [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": "Hi"}]}],
            ValueError,
            "sample 1: .*no assistant turn",
        ),
        (
            [{"text": "hello"}],
            ValueError,
            r"sample 0: a sample needs 'messages' or both 'prompt' and 'completion'; it has keys \['text'\]",
        ),
        ([{"messages": CONVERSATION, "prompt": "x"}], ValueError, "sample 0: .*keep one format"),
        (["hello"], TypeError, "sample 0: a sample must be a dict"),
    ],
)
def test_dataset_bad_samples(chatml_tokenizer, samples, error, match):
    with pytest.raises(error, match=match):
        encode_dataset(samples, chatml_tokenizer)


def test_dataset_bad_options_are_not_blamed_on_a_sample(chatml_tokenizer):
    with pytest.raises(ValueError, match=r"^on_empty='ignore'"):
        encode_dataset(_dataset(), chatml_tokenizer, on_empty="ignore")
    with pytest.raises(ValueError, match=r"^mode='x'"):
        encode_dataset(_dataset(), chatml_tokenizer, mode="x")


def test_encoders_do_not_modify_their_input(chatml_tokenizer):
    messages = copy.deepcopy(CONVERSATION)
    encode_chat(messages, chatml_tokenizer, mode="all")
    assert messages == CONVERSATION
    prompt, completion = [1, 2], [3]
    encode_prompt_completion(prompt, completion, eos_token_id=9)
    assert (prompt, completion) == ([1, 2], [3])


# ------------------------------------------------------------------- property based

_TEXT = st.text(alphabet="abcdeHIRS .,:?!\n#<>0123 ", max_size=12)
_TURN = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": _TEXT})
_END_OF_TURN = {"chatml_tokenizer": "<|im_end|>", "llama3_tokenizer": "<|eot_id|>", "plain_tokenizer": "<|endoftext|>"}
_GENERATION_PROMPT = {
    "chatml_tokenizer": "<|im_start|>assistant\n",
    "llama3_tokenizer": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "plain_tokenizer": "### Assistant: ",
}


@pytest.mark.parametrize("tokenizer_name", sorted(_END_OF_TURN))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(_TURN, min_size=1, max_size=5))
def test_random_conversations(request, tokenizer_name, messages):
    tokenizer = request.getfixturevalue(tokenizer_name)
    messages.append({"role": "assistant", "content": "Rome."})
    example = encode_chat(messages, tokenizer)
    # Same result without offsets, and the same ids as apply_chat_template.
    assert encode_chat(messages, NoOffsets(tokenizer)) == example
    assert example["input_ids"] == list(tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"])
    # One run per assistant turn: its content and end of turn, preceded at most by
    # the end of the generation prompt that BPE merged into its first token.
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = trained_runs(example, tokenizer)
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies, strict=True):
        reply = reply.strip() if tokenizer_name == "llama3_tokenizer" else reply
        assert run.endswith(reply + _END_OF_TURN[tokenizer_name])
        assert _GENERATION_PROMPT[tokenizer_name].endswith(
            run[: len(run) - len(reply) - len(_END_OF_TURN[tokenizer_name])]
        )
    # "all" trains a superset of "assistant"; "everything" trains every token.
    every = encode_chat(messages, tokenizer, mode="all")["labels"]
    assert all(a in (IGNORE, b) for a, b in zip(example["labels"], every, strict=True))
    assert encode_chat(messages, tokenizer, mode="everything")["labels"] == example["input_ids"]


def test_content_that_repeats_the_adjacent_header_is_the_content_copy(chatml_tokenizer):
    # Removing either "user\n" (the header's or the content's) gives the same empty
    # turn; the content is the copy right before <|im_end|>, not the header's.
    messages = [{"role": "user", "content": "user\n"}, {"role": "assistant", "content": "ok"}]
    example = encode_chat(messages, chatml_tokenizer, mode="all")
    ids, labels = example["input_ids"], example["labels"]
    assert trained_runs(example, chatml_tokenizer) == ["user\n", "ok<|im_end|>"]
    im_start = chatml_tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    user_start = [i for i, t in enumerate(ids) if t == im_start][1]
    user_end = [i for i, t in enumerate(ids) if t == im_end][1]
    user_targets = [i for i in range(user_start, user_end) if labels[i] != IGNORE]
    assert user_targets and user_targets[-1] == user_end - 1  # ends right before <|im_end|>
    assert chatml_tokenizer.decode(ids[user_start : user_targets[0]]) == "<|im_start|>user\n"


def test_opening_assistant_content_that_repeats_its_header(chatml_tokenizer):
    messages = [{"role": "assistant", "content": "assistant\n"}, {"role": "user", "content": "x"}]
    example = encode_chat(messages, chatml_tokenizer)
    assert trained_runs(example, chatml_tokenizer) == ["assistant\n<|im_end|>"]
    oracle = chatml_tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert [lab != IGNORE for lab in example["labels"]] == [bool(m) for m in oracle["assistant_masks"]]


@pytest.mark.parametrize(
    "template",
    [
        # the end-of-turn marker only after non-final messages
        (
            "{%- for m in messages -%}{{- m.role + ': ' + m.content -}}"
            "{%- if not loop.last -%}{{- eos_token + '\\n' -}}{%- endif -%}{%- endfor -%}"
        ),
        # the marker written at the start of the next turn
        (
            "{%- for m in messages -%}{%- if not loop.first -%}{{- eos_token + '\\n' -}}{%- endif -%}"
            "{{- m.role + ': ' + m.content -}}{%- endfor -%}"
        ),
    ],
)
def test_end_of_turn_marker_written_only_before_the_next_turn_is_trained(template):
    tokenizer = _fresh(build_plain_tokenizer, template)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Sure"},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "ok"},
    ]
    assert trained_runs(encode_chat(messages, tokenizer), tokenizer) == [" Sure<|endoftext|>", " ok"]
    assert trained_runs(encode_chat(messages, tokenizer, mode="all"), tokenizer) == [
        " hi", " Sure<|endoftext|>", "x", " ok",
    ]  # fmt: skip


# ------------------------------------------------- truncation before tokenization

# Long texts: a few words repeated into thousands of characters, so that the window
# (max_length + SLACK_TOKENS) * longest-token characters really cuts them.
_WORD = st.text(alphabet="abcdeSure Paris\n\n  ,.:?!#<>01é日", min_size=1, max_size=9)
_LONG_TEXT = st.builds(
    lambda words, size: ("".join(words) * size)[:size],
    st.lists(_WORD, min_size=1, max_size=8),
    st.one_of(st.integers(0, 50), st.integers(2_000, 8_000)),
)


def _truncated(example, max_length, side):
    keep = slice(None, max_length) if side == "right" else slice(-max_length, None)
    return {"input_ids": example["input_ids"][keep], "labels": example["labels"][keep]}


class _CountingCalls:
    """Records the longest text the wrapped tokenizer was asked to tokenize."""

    def __init__(self, tokenizer):
        self.longest = 0
        spy = self
        base = type(tokenizer)

        def call(self, text, *args, **kwargs):
            spy.longest = max(spy.longest, len(text))
            return base.__call__(self, text, *args, **kwargs)

        tokenizer.__class__ = type("Counting" + base.__name__, (base,), {"__call__": call})
        self.tokenizer = tokenizer


@pytest.mark.parametrize("tokenizer_name", ["chatml_tokenizer", "llama3_tokenizer", "plain_tokenizer"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    contents=st.lists(_LONG_TEXT, min_size=2, max_size=4),
    max_length=st.integers(1, 60),
    side=st.sampled_from(["right", "left"]),
    mode=st.sampled_from(CHAT_MODES),
)
def test_cut_before_tokenizing_gives_the_labels_of_the_whole(request, tokenizer_name, contents, max_length, side, mode):
    # Reproduction of the defect this guards: the whole text was tokenized before
    # truncation (9.6 GiB for a 50 MB line). The cut must not change any label.
    tokenizer = request.getfixturevalue(tokenizer_name)
    roles = ["user", "assistant"] * len(contents)
    messages = [{"role": role, "content": text} for role, text in zip(roles, contents)]
    whole = encode_chat(messages, tokenizer, mode=mode)
    cut = encode_chat(messages, tokenizer, mode=mode, max_length=max_length, truncation_side=side)
    assert cut == _truncated(whole, max_length, side)
    no_offsets = encode_chat(messages, NoOffsets(tokenizer), mode=mode, max_length=max_length, truncation_side=side)
    assert no_offsets == cut


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=_LONG_TEXT,
    completion=_LONG_TEXT,
    max_length=st.integers(1, 60),
    side=st.sampled_from(["right", "left"]),
    train_on_prompt=st.booleans(),
)
def test_cut_prompt_completion_gives_the_labels_of_the_whole(
    llama3_tokenizer, prompt, completion, max_length, side, train_on_prompt
):
    options = {"train_on_prompt": train_on_prompt}
    whole = encode_prompt_completion(prompt, completion, llama3_tokenizer, **options)
    cut = encode_prompt_completion(
        prompt, completion, llama3_tokenizer, max_length=max_length, truncation_side=side, **options
    )
    assert cut == _truncated(whole, max_length, side)


@pytest.mark.parametrize("side", ["right", "left"])
def test_only_a_window_of_a_long_text_is_tokenized(side):
    from lmloss._text_window import SLACK_TOKENS, max_token_chars

    spy = _CountingCalls(build_chatml_tokenizer())
    longest_token = max_token_chars(spy.tokenizer)
    assert longest_token == max(len(t) for t in spy.tokenizer.get_vocab())
    reply = "The capital of France is Paris. " * 20_000
    messages = [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": reply}]
    example = encode_chat(messages, spy.tokenizer, max_length=32, truncation_side=side)
    assert spy.longest <= (32 + SLACK_TOKENS) * longest_token < len(reply) // 100
    spy.longest = 0
    pair = encode_prompt_completion("Where?", reply, spy.tokenizer, max_length=32, truncation_side=side)
    assert spy.longest <= (32 + SLACK_TOKENS) * longest_token
    whole_chat, whole_pair = (
        encode_chat(messages, spy.tokenizer),
        encode_prompt_completion("Where?", reply, spy.tokenizer),
    )
    assert example == _truncated(whole_chat, 32, side) and pair == _truncated(whole_pair, 32, side)


# ------------------------------------------- fuzz: an independent character oracle

_FUZZ_TEXT = st.text(alphabet="abcSure Paris\n \t,.:?!#<>|_01é", max_size=30)
_FUZZ_TURN = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": _FUZZ_TEXT}
)


def _chatml_by_hand(messages) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """The ChatML rendering written out here (not by the template), with the character
    spans of each assistant reply (content + <|im_end|>) and of each other turn's content."""
    text = "" if messages[0]["role"] == "system" else "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    replies, contents = [], []
    for m in messages:
        text += f"<|im_start|>{m['role']}\n"
        start = len(text)
        text += m["content"] + "<|im_end|>"
        (replies if m["role"] == "assistant" else contents).append(
            (start, len(text)) if m["role"] == "assistant" else (start, start + len(m["content"]))
        )
        text += "\n"
    return text, replies, contents


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    messages=st.lists(_FUZZ_TURN, min_size=1, max_size=5),
    last=_FUZZ_TEXT,
    mode=st.sampled_from(["assistant", "last_assistant", "everything"]),
    max_length=st.one_of(st.none(), st.integers(1, 80)),
    side=st.sampled_from(["right", "left"]),
)
def test_fuzz_chat_labels_against_character_spans(chatml_tokenizer, messages, last, mode, max_length, side):
    messages = [*messages, {"role": "assistant", "content": last}]
    text, replies, _ = _chatml_by_hand(messages)
    spans = {"assistant": replies, "last_assistant": replies[-1:], "everything": [(0, len(text))]}[mode]
    encoding = chatml_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    # A token is trained when its characters overlap a trained span (a BPE token that
    # merges scaffolding with a reply's first characters carries content).
    trained = [any(s < b and e > a for a, b in spans) for s, e in encoding["offset_mapping"]]
    labels = [t if keep else IGNORE for t, keep in zip(ids, trained, strict=True)]
    if max_length is not None and len(ids) > max_length:
        keep = slice(None, max_length) if side == "right" else slice(-max_length, None)
        ids, labels = ids[keep], labels[keep]
    example = encode_chat(messages, chatml_tokenizer, mode=mode, max_length=max_length, truncation_side=side)
    assert example == {"input_ids": ids, "labels": labels}
    # Unshifted labels: a label is ignored or the input id at its own position.
    assert all(label in (IGNORE, token) for token, label in zip(example["input_ids"], example["labels"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=_FUZZ_TEXT,
    completion=_FUZZ_TEXT,
    train_on_prompt=st.booleans(),
    max_length=st.one_of(st.none(), st.integers(1, 40)),
    side=st.sampled_from(["right", "left"]),
)
def test_fuzz_prompt_completion_against_separate_tokenization(
    llama3_tokenizer, prompt, completion, train_on_prompt, max_length, side
):
    tok = llama3_tokenizer
    prompt_ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
    completion_ids = tok.encode(completion, add_special_tokens=False)
    if not completion_ids or completion_ids[-1] != tok.eos_token_id:
        completion_ids.append(tok.eos_token_id)
    ids = prompt_ids + completion_ids
    labels = (prompt_ids if train_on_prompt else [IGNORE] * len(prompt_ids)) + completion_ids
    if max_length is not None and len(ids) > max_length:
        keep = slice(None, max_length) if side == "right" else slice(-max_length, None)
        ids, labels = ids[keep], labels[keep]
    example = encode_prompt_completion(
        prompt, completion, tok, train_on_prompt=train_on_prompt, max_length=max_length, truncation_side=side
    )
    assert example == {"input_ids": ids, "labels": labels}


def test_whitespace_content_that_the_template_trims_away_trains_nothing(llama3_tokenizer):
    # Found by test_random_conversations: Llama 3 trims a system content of "\n" to
    # nothing, and "all" mode then saw two candidate "\n" in the scaffolding and raised.
    messages = [{"role": "system", "content": "\n"}, {"role": "assistant", "content": "Rome."}]
    example = encode_chat(messages, llama3_tokenizer, mode="all")
    assert example == encode_chat(messages, llama3_tokenizer, mode="assistant")
    assert trained_runs(example, llama3_tokenizer) == ["Rome.<|eot_id|>"]


# ----------------------------------------------- LLaMA-Factory's turn suffix (train_turn_suffix)


def _llamafactory_qwen_labels(messages, tokenizer, *, mask_history=False):
    """LLaMA-Factory's supervised recipe, written from its ``qwen`` template strings.

    ``format_system``: ``<|im_start|>system\\n{content}<|im_end|>\\n`` (before the first
    user turn), ``format_user``: ``<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n``,
    ``format_assistant``: ``{content}<|im_end|>\\n``. Each prompt and each answer is
    encoded on its own; the answers are the targets (only the last with ``mask_history``).
    """
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    pairs = [(rest[k]["content"], rest[k + 1]["content"]) for k in range(0, len(rest), 2)]
    ids, labels = [], []
    for k, (user, answer) in enumerate(pairs):
        prompt = f"<|im_start|>system\n{system}<|im_end|>\n" if k == 0 and system is not None else ""
        prompt += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        source = tokenizer.encode(prompt, add_special_tokens=False)
        target = tokenizer.encode(f"{answer}<|im_end|>\n", add_special_tokens=False)
        trained = not mask_history or k == len(pairs) - 1
        ids += source + target
        labels += [IGNORE] * len(source) + (target if trained else [IGNORE] * len(target))
    return ids, labels


@pytest.fixture(scope="module")
def builtin_chats_and_tokenizer():
    from lmloss.train.builtin import build_tokenizer, builtin_conversations

    chats = builtin_conversations()[:40]
    return chats, build_tokenizer([m["content"] for c in builtin_conversations() for m in c["messages"]])


@pytest.mark.parametrize("mask_history", [False, True])
def test_train_turn_suffix_gives_llamafactory_qwen_labels_token_for_token(builtin_chats_and_tokenizer, mask_history):
    chats, tokenizer = builtin_chats_and_tokenizer
    for chat in chats:
        ids, labels = _llamafactory_qwen_labels(chat["messages"], tokenizer, mask_history=mask_history)
        ours = encode_chat(chat["messages"], tokenizer, mask_history=mask_history, train_turn_suffix=True)
        assert ours["input_ids"] == ids
        assert ours["labels"] == labels


def test_without_turn_suffix_each_trained_turn_has_one_target_fewer(builtin_chats_and_tokenizer):
    # README: mode="last_assistant" is mask_history up to the "\n" after <|im_end|>.
    chats, tokenizer = builtin_chats_and_tokenizer
    newline = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\n"))
    for chat in chats:
        _, theirs = _llamafactory_qwen_labels(chat["messages"], tokenizer, mask_history=True)
        ours = encode_chat(chat["messages"], tokenizer, mode="last_assistant")["labels"]
        differ = [t for t, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        assert len(differ) == 1 and ours[differ[0]] == IGNORE and [theirs[differ[0]]] == newline


@pytest.mark.parametrize("tokenizer_name", ["chatml_tokenizer", "llama3_tokenizer", "plain_tokenizer"])
def test_train_turn_suffix_adds_only_the_whitespace_after_trained_turns(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    plain = encode_chat(CONVERSATION, tokenizer)
    suffixed = encode_chat(CONVERSATION, tokenizer, train_turn_suffix=True)
    assert suffixed["input_ids"] == plain["input_ids"]
    added = [t for t, (a, b) in enumerate(zip(plain["labels"], suffixed["labels"])) if a != b]
    assert all(plain["labels"][t] == IGNORE and suffixed["labels"][t] == plain["input_ids"][t] for t in added)
    assert all(not tokenizer.decode([plain["input_ids"][t]]).strip() for t in added)
    if tokenizer_name == "chatml_tokenizer":
        assert len(added) == 2  # one "\n" after each assistant turn's <|im_end|>


def test_train_turn_suffix_must_be_a_bool(chatml_tokenizer):
    with pytest.raises(TypeError, match="train_turn_suffix"):
        encode_chat(CONVERSATION, chatml_tokenizer, train_turn_suffix="yes")
    with pytest.raises(TypeError, match="train_turn_suffix"):
        encode_dataset([{"messages": CONVERSATION}], chatml_tokenizer, train_turn_suffix=1)


def test_encode_dataset_passes_train_turn_suffix(chatml_tokenizer):
    one = encode_chat(CONVERSATION, chatml_tokenizer, train_turn_suffix=True)
    assert encode_dataset([{"messages": CONVERSATION}], chatml_tokenizer, train_turn_suffix=True)[0] == one


# -------------------------------------------- cross-check with a template's {% generation %} mask


@pytest.mark.parametrize("messages", ORACLE_CONVERSATIONS)
def test_template_mask_mismatches_is_empty_on_a_generation_template(chatml_tokenizer, messages):
    assert lmloss.labels.template_mask_mismatches(messages, chatml_tokenizer) == []


def test_template_mask_mismatches_finds_a_template_that_marks_the_newline():
    tokenizer = build_chatml_tokenizer()
    # The same template with the "\n" after <|im_end|> inside the generation block.
    marked = CHATML_TEMPLATE.replace("{%- endgeneration -%}{{- '\\n' -}}", "{{- '\\n' -}}{%- endgeneration -%}")
    assert marked != CHATML_TEMPLATE
    tokenizer.chat_template = marked
    example = encode_chat(CONVERSATION, tokenizer)
    newline = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\n"))
    found = lmloss.labels.template_mask_mismatches(CONVERSATION, tokenizer)
    assert len(found) == 2  # one per assistant turn
    assert all(
        [example["input_ids"][t]] == newline and example["input_ids"][t - 1] == tokenizer.eos_token_id for t in found
    )


def test_template_mask_mismatches_needs_generation_markers(plain_tokenizer):
    with pytest.raises(ValueError, match="generation"):
        lmloss.labels.template_mask_mismatches(CONVERSATION, plain_tokenizer)
