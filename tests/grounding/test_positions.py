"""lmloss.grounding.positions: where in a tokenized batch the targets are box coordinates.

Truths: a real tokenizer's character offsets (independent of the token-id scan
under test), hand-built token rows, and the Qwen2.5-VL box loss written out on
materialized float64 logits.
"""

from __future__ import annotations

import re

import pytest
import torch
from _grounding_cases import COMMA, DIGITS, END, START, digit_row, python_giou

from _tokenizers import build_chatml_tokenizer
from lmloss.grounding import (
    BoxTokenIds,
    box_loss,
    box_loss_from_logits,
    find_box_targets,
    format_boxes,
    grounding_loss,
)
from lmloss.labels import encode_chat

_SNIPPET = 80  # the length at which grounding quotes malformed text
QWEN_MARKERS = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"]


# ----------------------------------------------------------------- positions


@pytest.fixture(scope="module")
def box_tokenizer():
    tokenizer = build_chatml_tokenizer()
    tokenizer.add_tokens(QWEN_MARKERS, special_tokens=True)
    return tokenizer


def _char_to_token(offsets: list[tuple[int, int]], char: int) -> int:
    hits = [i for i, (a, b) in enumerate(offsets) if a <= char < b]
    assert len(hits) == 1
    return hits[0]


def _digit_chars(text: str, answer_at: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """For each box in ``text`` after ``answer_at``: [(number, [(digit char, place)])] by regex."""
    boxes = []
    for box in re.finditer(r"<\|box_start\|>(.*?)<\|box_end\|>", text[answer_at:]):
        coords = []
        for number in re.finditer(r"\d+", box.group(1)):
            start = answer_at + box.start(1) + number.start()
            width = len(number.group())
            coords.append((int(number.group()), [(start + j, width - 1 - j) for j in range(width)]))
        boxes.append(coords)
    return boxes


def test_positions_in_a_real_tokenized_batch(box_tokenizer):
    tok = box_tokenizer
    answers = [
        "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(12,503),(600,1000)<|box_end|>",
        "Two: <|box_start|>(0,7),(45,99)<|box_end|> and <|box_start|>(100,200),(300,400)<|box_end|>.",
    ]
    prompt_box = "Is it at <|box_start|>(1,2),(3,4)<|box_end|>?"  # in the prompt: not a target
    chats = [[{"role": "user", "content": prompt_box}, {"role": "assistant", "content": a}] for a in answers]
    examples = [encode_chat(c, tok) for c in chats]
    width = max(len(e["input_ids"]) for e in examples)
    pad = tok.pad_token_id
    input_ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in examples])

    tokens = BoxTokenIds.from_tokenizer(tok)
    targets = find_box_targets(labels, tokens, input_ids=input_ids)

    # Hand-built expectation from the rendered text and the tokenizer's character offsets.
    expected_pos, expected_boxes, expected_place, expected_coord = [], [], [], []
    for b, (chat, example) in enumerate(zip(chats, examples)):
        text = tok.apply_chat_template(chat, tokenize=False)
        encoding = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        assert encoding["input_ids"] == example["input_ids"]
        answer_at = text.index(chat[1]["content"])
        for coords in _digit_chars(text, answer_at):
            expected_boxes.append([number / 1000 for number, _ in coords])
            for c, (_, digits) in enumerate(coords):
                for char, place in digits:
                    column = _char_to_token(encoding["offset_mapping"], char)
                    expected_pos.append(b * width + column - 1)  # shift: column - 1 predicts it
                    expected_place.append(place)
                    expected_coord.append(c)
    assert targets.positions.tolist() == expected_pos
    assert targets.place.tolist() == expected_place
    assert targets.coord_index.tolist() == expected_coord
    torch.testing.assert_close(targets.target_boxes, torch.tensor(expected_boxes))
    assert targets.row_index.tolist() == [0, 1, 1] and targets.box_index.tolist()[-1] == 2
    # The shift convention of causal_lm_loss: the target of position p is labels.flatten()[p + 1].
    digit_ids = torch.tensor(tokens.value_ids)
    assert labels.flatten()[targets.positions + 1].tolist() == digit_ids[targets.value_index].tolist()
    # Without input_ids the structure is read from the labels: same answer here.
    assert find_box_targets(labels, tokens).positions.tolist() == expected_pos


# Qwen2.5-VL answers: JSON boxes in pixels of each row's image (width, height).
QWEN25_ANSWERS = [
    format_boxes([(135, 7, 1016, 672), (12, 40, 90, 88)], "qwen2.5-vl", labels=["chair", "cup"]),
    '{"label": "dog", "bbox_2d": [0, 5, 63, 99]} is the only one.',
]
QWEN25_SIZES = [(1024, 768), (64, 100)]
QWEN25_PROMPT = 'Is it {"bbox_2d": [1, 2, 3, 4]}?'  # a box in the prompt: not a target
_QWEN25_LIST = re.compile(r'"bbox_2d"\s*:\s*\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]')


@pytest.fixture(scope="module")
def json_tokenizer():
    """lmloss's built-in byte-level BPE, trained on JSON answers, with digits split as Qwen2 does.

    The BPE learns merges such as '{"', 'bbox', ' "' and '],', so the "bbox_2d" key is
    tokenized differently in different contexts, as with Qwen's tokenizer.
    """
    from tokenizers import pre_tokenizers

    from lmloss.train.builtin import build_tokenizer

    tokenizer = build_tokenizer(QWEN25_ANSWERS * 10 + [QWEN25_PROMPT] * 5, vocab_size=320)
    # Qwen2's pre-tokenizer isolates every digit (\p{N}); the built-in one keeps numbers whole.
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return tokenizer


def _qwen25_batch(tok):
    chats = [[{"role": "user", "content": QWEN25_PROMPT}, {"role": "assistant", "content": a}] for a in QWEN25_ANSWERS]
    examples = [encode_chat(c, tok) for c in chats]
    width = max(len(e["input_ids"]) for e in examples)
    pad = tok.pad_token_id
    input_ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in examples])
    return chats, examples, input_ids, labels


def _qwen25_truth(tok, chats, examples):
    """Boxes found independently: regex on the rendered answer, the tokenizer's character offsets.

    Returns [(row, [[(column, place), ...] per coordinate], normalized target box)].
    """
    boxes = []
    for b, (chat, example) in enumerate(zip(chats, examples)):
        text = tok.apply_chat_template(chat, tokenize=False)
        encoding = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        assert encoding["input_ids"] == example["input_ids"]
        offsets = encoding["offset_mapping"]
        answer_at = text.index(chat[1]["content"])
        width, height = QWEN25_SIZES[b]
        for match in _QWEN25_LIST.finditer(text, answer_at):
            coords = []
            for k in range(1, 5):
                digits = []
                for char in range(match.start(k), match.end(k)):
                    column = _char_to_token(offsets, char)
                    assert offsets[column] == (char, char + 1)  # one digit per token
                    digits.append((column, match.end(k) - 1 - char))
                coords.append(digits)
            x1, y1, x2, y2 = (int(match.group(k)) for k in range(1, 5))
            boxes.append((b, coords, [x1 / width, y1 / height, x2 / width, y2 / height]))
    return boxes


def test_qwen25_vl_positions_in_a_real_tokenized_batch(json_tokenizer):
    tok = json_tokenizer
    chats, examples, input_ids, labels = _qwen25_batch(tok)
    width = labels.shape[1]
    tokens = BoxTokenIds.from_tokenizer(tok, "qwen2.5-vl")
    targets = find_box_targets(labels, tokens, input_ids=input_ids, image_size=QWEN25_SIZES)

    truth = _qwen25_truth(tok, chats, examples)
    assert [b for b, _, _ in truth] == [0, 0, 1]  # the prompt's box is not counted
    expected_pos = [b * width + column - 1 for b, coords, _ in truth for digits in coords for column, _ in digits]
    expected_place = [place for _, coords, _ in truth for digits in coords for _, place in digits]
    expected_coord = [c for _, coords, _ in truth for c, digits in enumerate(coords) for _ in digits]
    assert targets.positions.tolist() == expected_pos
    assert targets.place.tolist() == expected_place  # 1016 has 4 digits, 7 and 0 have one
    assert targets.coord_index.tolist() == expected_coord
    torch.testing.assert_close(targets.target_boxes, torch.tensor([box for _, _, box in truth]))
    assert targets.row_index.tolist() == [0, 0, 1]
    # Shifted like causal_lm_loss: position p predicts labels.flatten()[p + 1], a digit token.
    digit_ids = torch.tensor(tokens.value_ids)
    assert labels.flatten()[targets.positions + 1].tolist() == digit_ids[targets.value_index].tolist()
    # One (width, height) for every row gives the same positions (and its own normalization).
    same = find_box_targets(labels, tokens, image_size=(1024, 1024))
    assert same.positions.tolist() == expected_pos
    torch.testing.assert_close(same.target_boxes[2], torch.tensor([0, 5, 63, 99]) / 1024)
    assert targets.to("cpu").divisor.tolist() == targets.divisor.tolist()


def test_qwen25_vl_box_loss_equals_the_materialized_float64_computation(json_tokenizer):
    tok = json_tokenizer
    chats, examples, _input_ids, labels = _qwen25_batch(tok)
    targets = find_box_targets(labels, BoxTokenIds.from_tokenizer(tok, "qwen2.5-vl"), image_size=QWEN25_SIZES)
    g = torch.Generator().manual_seed(5)
    vocab, dim = len(tok), 8
    hidden = torch.randn(*labels.shape, dim, dtype=torch.float64, generator=g)
    weight = torch.randn(vocab, dim, dtype=torch.float64, generator=g)
    terms = box_loss(hidden, weight, targets, l1_weight=2.0, giou_weight=0.5, eps=0.0)

    # Truth: full float64 logits, the expected digit at each column - 1, numbers / image size.
    logits = hidden @ weight.T
    digit_ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    preds, boxes = [], []
    for b, coords, box in _qwen25_truth(tok, chats, examples):
        sizes = QWEN25_SIZES[b] * 2
        pred = []
        for c, digits in enumerate(coords):
            value = 0.0
            for column, place in digits:
                probs = torch.softmax(logits[b, column - 1, digit_ids], -1).tolist()
                value += 10**place * sum(d * p for d, p in enumerate(probs))
            pred.append(value / sizes[c])
        preds.append(pred)
        boxes.append(box)
    l1 = sum(sum(abs(p - q) for p, q in zip(pr, bx)) for pr, bx in zip(preds, boxes)) / len(boxes)
    g_loss = sum(1 - python_giou(pr, bx) for pr, bx in zip(preds, boxes)) / len(boxes)
    # rel 1e-7: the target boxes are stored in float32.
    assert terms["l1"].item() == pytest.approx(l1, rel=1e-7)
    assert terms["giou"].item() == pytest.approx(g_loss, rel=1e-7)
    assert terms["loss"].item() == pytest.approx(2.0 * l1 + 0.5 * g_loss, rel=1e-7)
    from_logits = box_loss_from_logits(logits, targets, l1_weight=2.0, giou_weight=0.5, eps=0.0)
    assert from_logits["loss"].item() == pytest.approx(terms["loss"].item(), rel=1e-12)
    out = grounding_loss(hidden, weight, labels, targets, l1_weight=2.0, giou_weight=0.5)
    assert out["l1"].item() == pytest.approx(l1, rel=1e-7)


def _char_row(text: str, merged: dict[int, str] | None = None) -> tuple[list[int], dict[int, str]]:
    """A character-level vocabulary (id = code point); ``merged`` ids stand for several characters."""
    texts = {i: chr(i) for i in range(128)} | (merged or {})
    return [ord(c) for c in text], texts


def test_qwen25_vl_malformed_token_boxes_raise_with_row_and_column_or_are_skipped():
    good = '{"bbox_2d": [1, 2, 3, 4]}'
    cases = {
        "not one digit token": ('{"bbox_2d": [', [1000], ", 3, 4, 5]}"),  # "12" as one token
        'expected 4 coordinates in "bbox_2d" [x1, y1, x2, y2], found 3': ('{"bbox_2d": [1, 2, 3]}', [], ""),
        "coordinate '1.5' is not a non-negative integer": ('{"bbox_2d": [1.5, 2, 3, 4]}', [], ""),
        "coordinate 700 is outside [0, 640] (a 640x480 image)": ('{"bbox_2d": [1, 2, 700, 4]}', [], ""),
        "x2 = 1 < x1 = 5": ('{"bbox_2d": [5, 2, 1, 4]}', [], ""),
        '"bbox_2d" is not followed by a list': ('{"bbox_2d": 7}', [], ""),
    }
    tokens = BoxTokenIds.json_digits([ord(str(d)) for d in range(10)], {1000: "12"} | {i: chr(i) for i in range(128)})
    for problem, (before, middle, after) in cases.items():
        row = [ord("A")] + [ord(c) for c in before] + middle + [ord(c) for c in after] + [ord(c) for c in good]
        labels = torch.tensor([row])
        with pytest.raises(ValueError, match=re.escape(problem)) as excinfo:
            find_box_targets(labels, tokens, image_size=(640, 480))
        assert "row 0, column 2" in str(excinfo.value)  # column of the key's opening quote
        skipped = find_box_targets(labels, tokens, image_size=(640, 480), on_error="skip")
        torch.testing.assert_close(skipped.target_boxes, torch.tensor([[1 / 640, 2 / 480, 3 / 640, 4 / 480]]))
    # Cut off by truncation: the list never closes.
    ids, texts = _char_row(good + ' {"bbox_2d": [5, 6')
    with pytest.raises(ValueError, match='unclosed "bbox_2d" list'):
        find_box_targets(
            torch.tensor([ids]), BoxTokenIds.json_digits([ord(str(d)) for d in range(10)], texts), image_size=(640, 480)
        )
    with pytest.raises(ValueError, match="token id 1000 is not in token_text"):
        find_box_targets(
            torch.tensor([[1000, ord("5")]]), BoxTokenIds.json_digits(range(48, 58), {53: "5"}), image_size=(8, 8)
        )
    # image_size: required for pixels, refused where it means nothing, one pair per row.
    with pytest.raises(ValueError, match="needs image_size"):
        find_box_targets(torch.tensor([ids]), tokens)
    with pytest.raises(ValueError, match="one such pair per row"):
        find_box_targets(torch.tensor([ids]), tokens, image_size=[(640, 480), (640, 480)])
    with pytest.raises(ValueError, match="not digits tokens"):
        find_box_targets(torch.tensor([[1]]), BoxTokenIds.digits(DIGITS, START, END), image_size=(640, 480))
    with pytest.raises(ValueError, match="json needs token_text"):
        BoxTokenIds("json", tuple(range(10)))


def test_qwen25_vl_numbers_merged_by_the_tokenizer_are_refused():
    """lmloss's built-in tokenizer as is (GPT-2 pre-tokenization) writes '135' as one token."""
    from lmloss.train.builtin import build_tokenizer

    tok = build_tokenizer(QWEN25_ANSWERS * 10, vocab_size=320)
    ids = tok.encode(QWEN25_ANSWERS[0])
    tokens = BoxTokenIds.from_tokenizer(tok, "qwen2.5-vl")  # the single digits exist
    with pytest.raises(ValueError, match="not one digit token"):
        find_box_targets(torch.tensor([ids]), tokens, image_size=(1024, 768))


def test_positions_of_bin_tokens_by_hand():
    # Vocabulary: 0..9 text, bins 10..17 (8 bins). Row 0: prompt [1 2], answer
    # [3, bins 2,5,6,7, 4]; row 1: shorter, padded, one box [1, 0, 7, 3].
    bins = list(range(10, 18))
    input_ids = torch.tensor([[1, 2, 3, 12, 15, 16, 17, 4], [1, 5, 11, 10, 17, 13, 4, 0]])
    labels = torch.tensor([[-100, -100, 3, 12, 15, 16, 17, 4], [-100, 5, 11, 10, 17, 13, 4, -100]])
    targets = find_box_targets(labels, BoxTokenIds.bins(bins), input_ids=input_ids)
    # Row 0 bins at columns 3..6 -> positions 2..5; row 1 at columns 2..5 -> 8 + 1..4.
    assert targets.positions.tolist() == [2, 3, 4, 5, 9, 10, 11, 12]
    assert targets.coord_index.tolist() == [0, 1, 2, 3] * 2
    assert targets.value_index.tolist() == [2, 5, 6, 7, 1, 0, 7, 3]
    # Centres (k + 0.5) / 8.
    expected = torch.tensor([[2.5, 5.5, 6.5, 7.5], [1.5, 0.5, 7.5, 3.5]]) / 8
    torch.testing.assert_close(targets.target_boxes, expected)
    # shift=False: the position is the column itself.
    unshifted = find_box_targets(labels, BoxTokenIds.bins(bins), shift=False)
    assert unshifted.positions.tolist() == [3, 4, 5, 6, 10, 11, 12, 13]
    # yxyx order (PaliGemma): the first token is y1.
    yx = find_box_targets(labels, BoxTokenIds.bins(bins, order="yxyx"))
    assert yx.coord_index.tolist()[:4] == [1, 0, 3, 2]
    torch.testing.assert_close(yx.target_boxes[0], torch.tensor([5.5, 2.5, 7.5, 6.5]) / 8)


def test_malformed_token_boxes_raise_with_row_and_column_or_are_skipped():
    tokens = BoxTokenIds.digits(DIGITS, START, END, merged_digit_ids=[33])
    good = digit_row(1, 2, 3, 4)
    cases = {
        "unclosed box": [1] + good[:-1],  # truncated before <|box_end|>
        "expected 4 numbers in the box, found 3": [1] + digit_row(1, 2, 3),
        "holds several characters with a digit": [1] + good[:3] + [33] + good[3:],
        "x2 = 1 < x1 = 5": [1] + digit_row(5, 2, 1, 4),
        "coordinate 1001 is outside [0, 1000] (the 0-1000 grid)": [1] + digit_row(1, 2, 1001, 4),
    }
    for problem, row in cases.items():
        labels = torch.tensor([row + good])
        with pytest.raises(ValueError, match=re.escape(problem)) as excinfo:
            find_box_targets(labels, tokens)
        assert "row 0, column 1" in str(excinfo.value)
        skipped = find_box_targets(labels, tokens, on_error="skip")
        assert skipped.num_boxes == 1  # only the good box remains
        torch.testing.assert_close(skipped.target_boxes, torch.tensor([[0.001, 0.002, 0.003, 0.004]]))
    # Partly masked box: some digits trained, some not.
    labels = torch.tensor([[1] + good])
    labels[0, 2] = -100  # the digit of x1
    with pytest.raises(ValueError, match="only some of its coordinate tokens"):
        find_box_targets(labels, tokens, input_ids=torch.tensor([[1] + good]))
    # Fully masked box (the prompt): silently not a target, even if malformed.
    ids = torch.tensor([[1] + digit_row(1, 2, 3) + good])
    labels = ids.clone()
    labels[0, : len(digit_row(1, 2, 3)) + 1] = -100
    assert find_box_targets(labels, tokens, input_ids=ids).num_boxes == 1


def test_a_number_of_thousands_of_digits_is_a_malformed_box_with_row_and_column():
    # Reproduction: int() of the digits raised its bare 4,300-digit-limit ValueError,
    # naming neither row nor column.
    huge = [DIGITS[1]] * 4400
    row = [1, START, DIGITS[1], COMMA, DIGITS[2], COMMA, *huge, COMMA, DIGITS[4], END]
    with pytest.raises(ValueError, match=r"row 0, column 1: coordinate inf is not a finite number"):
        find_box_targets(torch.tensor([row]), BoxTokenIds.digits(DIGITS, START, END))
    text = '{"bbox_2d": [1, 2, ' + "1" * 4400 + ", 4]}"
    tokens = BoxTokenIds.json_digits([ord(str(d)) for d in range(10)], {i: chr(i) for i in range(128)})
    with pytest.raises(ValueError, match=r"row 0, column 2: coordinate inf is not a finite number"):  # the key
        find_box_targets(torch.tensor([[ord("A")] + [ord(c) for c in text]]), tokens, image_size=(640, 480))


def test_merged_digit_tokens_are_refused_by_from_tokenizer():
    class GPT2Like:  # encodes "7" fine but its vocabulary is irrelevant; "5" merges
        def encode(self, text, add_special_tokens=False):
            return [1, 2] if text == "5" else [ord(text[0])]

        def get_vocab(self):
            return {}

    with pytest.raises(ValueError, match="'5' encodes to 2 tokens"):
        BoxTokenIds.from_tokenizer(GPT2Like())
