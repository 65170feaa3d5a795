"""lmloss.jsonl: bad bytes and deep nesting are bad lines named by file:line, never a
traceback from the decoder or the parser; the metrics reader of ``lmloss plot`` too."""

from __future__ import annotations

import json

import pytest

from lmloss.jsonl import (
    MAX_JSON_DEPTH,
    DataError,
    NestingError,
    check_json_depth,
    iter_jsonl,
    loads_bounded,
    read_jsonl_records,
    scan_samples,
)
from lmloss.monitor.sinks import read_jsonl

CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


def write_bytes(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def good() -> bytes:
    return json.dumps(CHAT).encode()


def test_invalid_utf8_is_one_bad_line_named_by_file_and_line(tmp_path):
    # The reproduction: a 0xff byte inside a sample gave "'utf-8' codec can't decode byte
    # 0xff in position 543", naming neither file nor line, for the whole file.
    bad = good().replace(b"Hello.", b"Hel\xfflo.")
    path = write_bytes(tmp_path / "d.jsonl", [good(), bad, good()])
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid UTF-8 \(byte 0xff") as info:
        read_jsonl_records(path)
    assert (info.value.path, info.value.line) == (path, 2)
    results = [value for _, value in scan_samples(path)]
    assert [type(v).__name__ for v in results] == ["Record", "DataError", "Record"]
    assert [r.line for r in results if not isinstance(r, DataError)] == [1, 3]


def test_a_byte_order_mark_and_crlf_line_ends_are_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good() + b"\r\n" + good() + b"\r\n")
    assert [r.data for r in read_jsonl_records(path)] == [CHAT, CHAT]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deep_nesting_is_a_bad_line_not_a_recursion_error(tmp_path, depth):
    # json.loads raises RecursionError at about 1,000 levels.
    deep = json.dumps({"messages": "X"}).replace('"X"', nested(depth)).encode()
    path = write_bytes(tmp_path / "d.jsonl", [good(), deep])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: JSON nested deeper than {MAX_JSON_DEPTH} levels"):
        read_jsonl_records(path)


def test_depth_bound_is_exact_and_ignores_brackets_inside_strings():
    at_limit = nested(MAX_JSON_DEPTH)
    assert loads_bounded(at_limit) == json.loads(at_limit)
    with pytest.raises(NestingError) as info:
        loads_bounded(nested(MAX_JSON_DEPTH + 1))
    assert info.value.limit == MAX_JSON_DEPTH
    # Brackets (and escaped quotes) inside strings are text, not nesting.
    text = json.dumps({"content": '\\"[' * 10_000 + "{" * 10_000})
    check_json_depth(text)
    assert loads_bounded(text) == json.loads(text)
    # Objects count as well as arrays.
    with pytest.raises(NestingError):
        check_json_depth('{"a":' * (MAX_JSON_DEPTH + 1) + "1" + "}" * (MAX_JSON_DEPTH + 1))


def test_an_integer_beyond_python_s_digit_limit_is_a_bad_line(tmp_path):
    path = write_bytes(tmp_path / "d.jsonl", [b'{"input_ids": [' + b"9" * 5000 + b'], "labels": [1]}'])
    [(line, value)] = list(iter_jsonl(path))
    assert line == 1 and isinstance(value, DataError) and "not valid JSON" in str(value)


def test_metrics_reader_of_lmloss_plot_skips_a_deep_line(tmp_path):
    record = json.dumps({"step": 1, "split": "train", "loss": 1.0}).encode()
    path = write_bytes(tmp_path / "metrics.jsonl", [record, nested(100_000).encode(), record])
    log = read_jsonl(path)
    assert len(log.records) == 2
    [skipped] = log.skipped
    assert skipped.line == 2 and f"nested deeper than {MAX_JSON_DEPTH}" in skipped.reason
