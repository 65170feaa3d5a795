"""lmloss.samples: pre-tokenized ids are integers inside the vocabulary, checked with
their position; never rounded, never passed on to fail as an IndexError."""

from __future__ import annotations

import pytest

from lmloss.samples import pretokenized_example, sample_error

V = 10


def test_valid_sample_is_returned_as_python_ints():
    ex = pretokenized_example([0, 5, 9], [-100, 5, 9], vocab_size=V)
    assert ex == {"input_ids": [0, 5, 9], "labels": [-100, 5, 9]}


@pytest.mark.parametrize(
    "ids, labels, match",
    [
        ([1, 10], [1, 1], r"'input_ids'\[1\] = 10 is outside the vocabulary \(expected \[0, 10\)\)"),
        ([1, -1], [1, 1], r"'input_ids'\[1\] = -1 is outside the vocabulary"),
        ([1, 1], [1, 10], r"'labels'\[1\] = 10 is outside the vocabulary \(expected \[0, 10\) or -100\)"),
        ([1, 1], [1, -5], r"'labels'\[1\] = -5 is outside"),
        ([1, 1.9], [1, 1], r"'input_ids'\[1\] = 1\.9 is not an integer"),
        ([1, 2.0], [1, 1], r"'input_ids'\[1\] = 2\.0 is not an integer"),
        ([1, 1], [True, 1], r"'labels'\[0\] = True is not an integer"),
        ([1, "2"], [1, 1], r"'input_ids'\[1\] = '2' is not an integer"),
        ([2**63], [1], r"'input_ids'\[0\] = 9223372036854775808 is outside"),
        ([10**5000], [1], r"'input_ids'\[0\] = an int of 16610 bits is outside"),
        ([1, 2], [1], r"'input_ids' has 2 tokens but 'labels' has 1"),
        ([], [], r"'input_ids' is empty"),
        ("12", [1, 2], r"'input_ids' must be a list of ints, got str"),
    ],
)
def test_bad_samples_name_the_field_and_position(ids, labels, match):
    with pytest.raises(ValueError, match=match):
        pretokenized_example(ids, labels, vocab_size=V)


def test_ignore_index_is_the_one_label_outside_the_vocabulary():
    assert pretokenized_example([1, 2], [-1, 2], vocab_size=V, ignore_index=-1)["labels"] == [-1, 2]
    with pytest.raises(ValueError, match="outside"):
        pretokenized_example([1, 2], [-100, 2], vocab_size=V, ignore_index=-1)


def test_sample_formats():
    assert sample_error({"messages": []}) is None
    assert sample_error({"prompt": "a", "completion": "b"}) is None
    assert sample_error({"input_ids": [1], "labels": [1]}) is None
    assert "got list" in sample_error([1])
    assert "it has keys ['prompt']" in sample_error({"prompt": "a"})
