"""lmloss._text_window: windows for tokenizing only what truncation keeps, and the
fallback for tokenizers whose tokens cover more text than their own strings."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lmloss._text_window import SLACK_TOKENS, enough_tokens, max_token_chars, text_windows
from lmloss.labels import encode_prompt_completion


def test_windows_grow_from_the_kept_side_and_end_with_the_whole_text():
    text = "".join(chr(ord("a") + i % 26) for i in range(10_000))
    right = list(text_windows(text, 6, "right", 10))
    left = list(text_windows(text, 6, "left", 10))
    first = (6 + SLACK_TOKENS) * 10
    assert [len(p) for p, _ in right] == [first, 2 * first, 4 * first, 8 * first, 10_000]
    assert all(p == text[: len(p)] and start == 0 for p, start in right)
    assert all(p == text[start:] for p, start in left) and left[-1] == (text, 0)
    assert list(text_windows("short", 6, "right", 10)) == [("short", 0)]
    assert enough_tokens(6 + SLACK_TOKENS, 6) and not enough_tokens(5 + SLACK_TOKENS, 6)


def _word_level() -> PreTrainedTokenizerFast:
    """Whitespace is no token here (BERT-like): a token covers more text than its string."""
    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2, "</s>": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]")


@pytest.mark.parametrize("side", ["right", "left"])
def test_tokens_wider_than_their_strings_fall_back_to_larger_windows(side):
    tokenizer = _word_level()
    assert max_token_chars(tokenizer) == len("[UNK]")
    # Thousands of spaces between words, and words far longer than any token string
    # ([UNK] for "zzzz..."): the first window holds too few tokens, so it grows.
    prompt = " ".join(["a" + " " * 500, "z" * 3000, "b"] * 40)
    completion = " ".join(["b", " " * 700, "a"] * 40)
    whole = encode_prompt_completion(prompt, completion, tokenizer)
    for max_length in (1, 5, 100, len(whole["input_ids"]) - 1):
        cut = encode_prompt_completion(prompt, completion, tokenizer, max_length=max_length, truncation_side=side)
        keep = slice(None, max_length) if side == "right" else slice(-max_length, None)
        assert cut == {"input_ids": whole["input_ids"][keep], "labels": whole["labels"][keep]}


def test_max_token_chars_follows_a_growing_vocabulary():
    tokenizer = _word_level()
    assert max_token_chars(tokenizer) == 5
    tokenizer.add_tokens(["<|a_much_longer_token|>"])
    assert max_token_chars(tokenizer) == len("<|a_much_longer_token|>")
    assert max_token_chars(object()) is None
