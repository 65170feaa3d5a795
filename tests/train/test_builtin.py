"""The built-in data set, tokenizer and models: everything a run needs, nothing downloaded."""

from __future__ import annotations

import pytest
import torch

from lmloss.labels import encode_dataset
from lmloss.train.builtin import MODEL_SIZES, build_model, build_tokenizer, builtin_conversations


@pytest.fixture(scope="module")
def data_and_tokenizer():
    chats = builtin_conversations()
    texts = [m["content"] for c in chats for m in c["messages"]]
    return chats, build_tokenizer(texts)


def test_builtin_conversations_are_well_formed(data_and_tokenizer):
    chats, _ = data_and_tokenizer
    assert len(chats) == 400
    questions = {m["content"] for c in chats for m in c["messages"] if m["role"] == "user"}
    assert "Where is the capital of China?" in questions
    for chat in chats:
        roles = [m["role"] for m in chat["messages"] if m["role"] != "system"]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert roles == ["user", "assistant"] * (len(roles) // 2)  # turns alternate


def test_every_conversation_trains_its_answers_and_their_end_of_turn(data_and_tokenizer):
    chats, tokenizer = data_and_tokenizer
    examples = encode_dataset(chats, tokenizer, mode="assistant", on_empty="error")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == im_end and tokenizer.pad_token_id != im_end
    for chat, example in zip(chats, examples):
        trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
        answers = [m["content"] for m in chat["messages"] if m["role"] == "assistant"]
        # Exactly the answers and one <|im_end|> after each: decode to compare with the text.
        assert trained.count(im_end) == len(answers)
        assert tokenizer.decode(trained) == "<|im_end|>".join(answers) + "<|im_end|>"


def test_tokenizer_round_trips_and_renders_chatml(data_and_tokenizer):
    _, tokenizer = data_and_tokenizer
    text = "The capital is Beijing."
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_models_build_and_run(size):
    model = build_model(300, size)
    logits = model(torch.randint(0, 300, (2, 7))).logits
    assert logits.shape == (2, 7, 300)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        build_model(300, "huge")
    with pytest.raises(ValueError, match="vocab_size must be an int >= 300"):
        build_tokenizer(["a b c"], vocab_size=10)


def test_split_digits_makes_one_token_per_digit():
    texts = ["The box is at 135, 2048 and 7."] * 20
    whole = build_tokenizer(texts, vocab_size=300)
    split = build_tokenizer(texts, vocab_size=300, split_digits=True)
    assert any(
        len(whole.decode([i])) > 1 and whole.decode([i]).strip().isdigit()
        for i in whole("135 2048", add_special_tokens=False).input_ids
    )
    pieces = [split.decode([i]) for i in split("135 2048", add_special_tokens=False).input_ids]
    assert [p.strip() for p in pieces if p.strip()] == list("1352048")
    assert split.decode(split("135 2048").input_ids) == "135 2048"


def test_template_generation_mask_equals_lmloss_labels_on_every_builtin_chat(data_and_tokenizer):
    # transformers computes the mask from the template's {% generation %} markers: an
    # oracle independent of lmloss's turn-by-turn rendering.
    from lmloss.labels import template_mask_mismatches

    chats, tokenizer = data_and_tokenizer
    for chat in chats:
        assert template_mask_mismatches(chat["messages"], tokenizer) == []
        masked = tokenizer.apply_chat_template(chat["messages"], return_dict=True, return_assistant_tokens_mask=True)
        assert sum(masked["assistant_masks"]) > 0


def test_template_generation_markers_change_no_rendered_text(data_and_tokenizer):
    _, tokenizer = data_and_tokenizer
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )


def test_template_generation_markers_satisfy_trl_assistant_only_loss(data_and_tokenizer):
    # TRL's own checks: it uses the template as is (no replacement) and finds the
    # end-of-turn token inside the assistant mask (so the model learns to stop).
    chat_template_utils = pytest.importorskip("trl.chat_template_utils")
    _, tokenizer = data_and_tokenizer
    assert chat_template_utils.has_generation_markers(tokenizer.chat_template)
    assert chat_template_utils.is_chat_template_stop_token_trained(tokenizer)
