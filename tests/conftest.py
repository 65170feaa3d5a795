"""Shared fixtures: real tokenizers built locally (see tests/_tokenizers.py).

The fixtures are session-scoped, so tests must not modify them; a test that needs
to change a tokenizer (e.g. remove its chat template) calls the builder for a
fresh one.
"""

from __future__ import annotations

import pytest

from _tokenizers import build_chatml_tokenizer, build_llama3_tokenizer, build_plain_tokenizer


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """Qwen2.5-Instruct-like ChatML tokenizer: eos ``<|im_end|>``, pad ``<|endoftext|>``."""
    return build_chatml_tokenizer()


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """Llama-3-like header template; turns end with ``<|eot_id|>``, eos is ``<|end_of_text|>``."""
    return build_llama3_tokenizer()


@pytest.fixture(scope="session")
def plain_tokenizer():
    """Plain-text ``### Assistant: `` template; eos == pad == ``<|endoftext|>``."""
    return build_plain_tokenizer()
