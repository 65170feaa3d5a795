"""Data of ``lmloss train``: bad files and samples named by line, mix weights, epochs."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lmloss.train.builtin import build_tokenizer
from lmloss.train.config import TrainConfig
from lmloss.train.data import DataReport, TrainData, encode_records, epoch_micro_batches, load_records

CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["Hi? Hello. What is 2 plus 2? It is 4."] * 4, vocab_size=300)


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def records(tmp_path, lines, **options):
    config = TrainConfig(data=[write(tmp_path / "d.jsonl", lines)], eval_fraction=0.0, **options)
    sources, _ = load_records(config)
    return sources[0].records, config


def test_empty_file(tmp_path):
    with pytest.raises(ValueError, match=r"d\.jsonl: has no samples: the file is empty"):
        records(tmp_path, [])


def test_non_json_line_names_its_line(tmp_path):
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        records(tmp_path, [CHAT, "{oops", CHAT])


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"messages": [{"role": "user", "content": "Hi?"}]}, "has no assistant turn"),
        ({"messages": [{"role": "human", "content": "Hi?"}, {"role": "gpt", "content": "Yo."}]}, "not a known role"),
    ],
)
def test_bad_sample_is_an_error_with_its_line_or_a_report(tmp_path, tokenizer, bad, message):
    recs, config = records(tmp_path, [CHAT, CHAT, bad, CHAT])
    with pytest.raises(ValueError, match=rf"d.jsonl:3: .*{message}(.|\n)*--skip-bad-samples"):
        encode_records(recs, tokenizer, config, DataReport(), "train")
    recs, config = records(tmp_path, [CHAT, CHAT, bad, CHAT], skip_bad_samples=True)
    report = DataReport()
    examples = encode_records(recs, tokenizer, config, report, "train")
    assert len(examples) == 3
    assert len(report.skipped) == 1 and report.skipped[0].startswith(str(tmp_path / "d.jsonl") + ":3: ")
    assert any("skipped 1 samples" in line for line in report.lines())


def test_truncation_is_reported_and_emptied_samples_are_dropped(tmp_path, tokenizer):
    long_prompt = {"prompt": "What is 2 plus 2? " * 20, "completion": "It is 4."}
    short = {"prompt": "What is 2 plus 2?", "completion": " It is 4. " * 10}
    recs, config = records(tmp_path, [long_prompt, short], max_length=24)
    report = DataReport()
    examples = encode_records(recs, tokenizer, config, report, "train")
    assert len(examples) == 1 and len(examples[0]["input_ids"]) == 24
    assert report.no_target == [f"{tmp_path / 'd.jsonl'}:1 (after truncation)"]
    assert report.truncated == [f"{tmp_path / 'd.jsonl'}:2"]


def test_prompt_completion_masks_the_prompt(tmp_path, tokenizer):
    recs, config = records(tmp_path, [{"prompt": "What is 2 plus 2?", "completion": " It is 4."}])
    (example,) = encode_records(recs, tokenizer, config, DataReport(), "train")
    prompt_len = len(tokenizer("What is 2 plus 2?", add_special_tokens=False).input_ids)
    assert example["labels"][:prompt_len] == [-100] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id


TWO_TURNS = {
    "messages": [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "It is 4."},
    ]
}


@pytest.mark.parametrize("masking", ["assistant", "last_assistant", "all"])
def test_train_turn_suffix_reaches_chat_encoding(tmp_path, tokenizer, masking):
    """--train-turn-suffix labels chats exactly as encode_chat(train_turn_suffix=True): the
    newline after each trained <|im_end|> becomes a target (LLaMA-Factory's labels)."""
    from lmloss.labels import encode_chat

    lines = [CHAT, TWO_TURNS]
    recs, plain_config = records(tmp_path, lines, masking=masking)
    recs, suffix_config = records(tmp_path, lines, masking=masking, train_turn_suffix=True)
    plain = encode_records(recs, tokenizer, plain_config, DataReport(), "train")
    suffixed = encode_records(recs, tokenizer, suffix_config, DataReport(), "train")
    for line, ex, ex_plain in zip(lines, suffixed, plain):
        assert ex == encode_chat(line["messages"], tokenizer, mode=masking, train_turn_suffix=True)
        assert ex["input_ids"] == ex_plain["input_ids"]
        # The labels differ exactly at the newline after trained turns' <|im_end|>.
        changed = [t for t, (a, b) in enumerate(zip(ex["labels"], ex_plain["labels"])) if a != b]
        assert changed and all(ex_plain["labels"][t] == -100 for t in changed)
        assert all(tokenizer.decode([ex["input_ids"][t]]) == "\n" for t in changed)
        assert all(tokenizer.convert_ids_to_tokens(ex["input_ids"][t - 1]) == "<|im_end|>" for t in changed)
    # One newline per trained assistant turn ("all" trains user contents, not their <|im_end|>).
    trained_turns = {"assistant": [1, 2], "last_assistant": [1, 1], "all": [1, 2]}[masking]
    assert [sum(a != b for a, b in zip(x["labels"], y["labels"])) for x, y in zip(suffixed, plain)] == trained_turns


def _example(tag: int) -> dict:
    return {"input_ids": [tag] * (tag % 5 + 1), "labels": [tag] * (tag % 5 + 1)}


def test_mix_weights_repeat_and_subsample_per_epoch():
    a = [_example(i) for i in range(10)]
    b = [_example(100 + i) for i in range(10)]
    data = TrainData([a, b], [2.0, 0.5], [], [], DataReport())
    config = TrainConfig(batch_size=3)
    seen = [Counter(ex["input_ids"][0] for mb in epoch_micro_batches(data, config, e) for ex in mb) for e in (0, 1)]
    for counts in seen:
        assert all(counts[i] == 2 for i in range(10))  # weight 2: every sample twice
        assert sum(counts[100 + i] for i in range(10)) == 5  # weight 0.5: half of them
        assert all(counts[100 + i] <= 1 for i in range(10))
    assert {k for k in seen[0] if k >= 100} != {k for k in seen[1] if k >= 100}  # a new half each epoch
    # The same (seed, epoch) gives the same order: what resuming relies on.
    assert epoch_micro_batches(data, config, 1) == epoch_micro_batches(data, config, 1)
    assert epoch_micro_batches(data, config, 0) != epoch_micro_batches(data, config, 1)


def test_batches_by_tokens():
    examples = [_example(i) for i in range(20)]
    data = TrainData([examples], [1.0], [], [], DataReport())
    batches = epoch_micro_batches(data, TrainConfig(batch_tokens=7), 0)
    assert sum(len(mb) for mb in batches) == 20
    for mb in batches:
        assert sum(len(ex["input_ids"]) for ex in mb) <= 7


def test_held_out_split_is_per_source_and_seeded(tmp_path):
    path = write(tmp_path / "d.jsonl", [dict(CHAT, id=i) for i in range(40)])
    config = TrainConfig(data=[path], eval_fraction=0.1, seed=3)
    (source,), held = load_records(config)
    assert len(held) == 4 and len(source.records) == 36
    assert {r.line for r in held}.isdisjoint(r.line for r in source.records)
    assert [r.line for r in load_records(config)[1]] == [r.line for r in held]


# --- hardening: pre-tokenized ids, bad bytes, deep nesting, long samples -----------------


@pytest.mark.parametrize(
    "ids, labels, match",
    [
        # Reproductions: an id outside the vocabulary was an IndexError traceback in the
        # embedding; 1.9 was silently truncated to 1, true to 1; 2**63 overflowed int64
        # ("Overflow when unpacking long long") without file or line.
        ([1, "V"], [1, 1], r"'input_ids'\[1\] = V is outside the vocabulary \(expected \[0, V\)\)"),
        ([1, 2], [1, "V"], r"'labels'\[1\] = V is outside the vocabulary \(expected \[0, V\) or -100\)"),
        ([1, 1.9], [1, 1], r"'input_ids'\[1\] = 1\.9 is not an integer"),
        ([1, True], [1, 1], r"'input_ids'\[1\] = True is not an integer"),
        ([1, 2**63], [1, 1], r"'input_ids'\[1\] = 9223372036854775808 is outside the vocabulary"),
    ],
)
def test_pretokenized_ids_are_checked_at_load_with_file_and_line(tmp_path, tokenizer, ids, labels, match):
    vocab = len(tokenizer)  # "V": the first id outside the vocabulary
    ids, labels = ([vocab if i == "V" else i for i in seq] for seq in (ids, labels))
    match = match.replace("V", str(vocab))
    recs, config = records(tmp_path, [CHAT, {"input_ids": ids, "labels": labels}])
    with pytest.raises(ValueError, match=rf"d.jsonl:2: {match}"):
        encode_records(recs, tokenizer, config, DataReport(), "train")
    recs, config = records(tmp_path, [CHAT, {"input_ids": ids, "labels": labels}], skip_bad_samples=True)
    report = DataReport()
    assert len(encode_records(recs, tokenizer, config, report, "train")) == 1
    assert [s.split(": ")[0] for s in report.skipped] == [f"{tmp_path / 'd.jsonl'}:2"]


def test_invalid_utf8_names_the_line_and_is_skippable(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    bad = json.dumps(CHAT).replace("Hello.", "Hel\udcfflo.", 1).encode("utf-8", "surrogateescape")
    path.write_bytes(json.dumps(CHAT).encode() + b"\n" + bad + b"\n" + json.dumps(CHAT).encode() + b"\n")
    assert b"\xff" in path.read_bytes()
    config = TrainConfig(data=[str(path)], eval_fraction=0.0)
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid UTF-8 .*--skip-bad-samples"):
        load_records(config)
    config = TrainConfig(data=[str(path)], eval_fraction=0.0, skip_bad_samples=True)
    (source,), _ = load_records(config)
    report = DataReport()
    assert len(encode_records(source.records, tokenizer, config, report, "train")) == 2
    assert len(report.skipped) == 1 and report.skipped[0].startswith(f"{path}:2: not valid UTF-8 (byte 0xff")


def test_deep_nesting_is_a_line_error_not_a_recursion_error(tmp_path):
    deep = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(ValueError, match=r"d.jsonl:2: JSON nested deeper than 100 levels"):
        records(tmp_path, [CHAT, deep])


def test_a_long_sample_is_cut_as_encoding_it_whole_would(tmp_path, tokenizer):
    from lmloss.labels import encode_chat

    long_chat = {
        "messages": [
            {"role": "user", "content": "What is 2 plus 2? " * 2000},
            {"role": "assistant", "content": "It is 4. " * 3000},
        ]
    }
    recs, config = records(tmp_path, [long_chat, CHAT], max_length=40)
    report = DataReport()
    examples = encode_records(recs, tokenizer, config, report, "train")
    whole = encode_chat(long_chat["messages"], tokenizer)
    assert len(whole["input_ids"]) > 10_000
    # The long sample has no target in its first 40 tokens (all prompt): dropped, as before.
    assert report.no_target == [f"{tmp_path / 'd.jsonl'}:1 (after truncation)"] and len(examples) == 1
    flipped = {"messages": long_chat["messages"][::-1]}
    flipped["messages"][0]["role"], flipped["messages"][1]["role"] = "assistant", "user"
    recs, config = records(tmp_path, [flipped], max_length=40)
    report = DataReport()
    (example,) = encode_records(recs, tokenizer, config, report, "train")
    whole = encode_chat(flipped["messages"], tokenizer)
    assert example == {"input_ids": whole["input_ids"][:40], "labels": whole["labels"][:40]}
    assert report.truncated == [f"{tmp_path / 'd.jsonl'}:1"]


_PEAK_SCRIPT = """
import json, sys
from lmloss.bench import peak_rss_bytes
from lmloss.train.builtin import build_tokenizer
from lmloss.train.config import TrainConfig
from lmloss.train.data import DataReport, encode_records, load_records
tokenizer = build_tokenizer(["What is 2 plus 2? It is 4. The sea is wide."] * 4, vocab_size=300)
config = TrainConfig(data=[sys.argv[1]], eval_fraction=0.0, max_length=256)
(source,), _ = load_records(config)
examples = encode_records(source.records, tokenizer, config, DataReport(), "train")
print(json.dumps({"length": len(examples[0]["input_ids"]),
                  "peak_kib": peak_rss_bytes() // 1024}))
"""


def test_memory_of_a_50_mb_line_is_bounded_by_max_length(tmp_path):
    # Reproduction: a 50 MB line peaked at 9.6 GiB with --max-length 256, because the
    # whole text was tokenized (ids and offsets of ~10M tokens) before truncation.
    # Encoded in a window, the peak is the interpreter, torch and a few copies of the text.
    # The child reads VmHWM (peak_rss_bytes), not ru_maxrss: at exec Linux carries the forking
    # parent's peak into ru_maxrss, so a large pytest process would be measured instead.
    import os
    import subprocess
    import sys

    answer = "The sea is wide, the sea is deep. " * 1_500_000
    path = tmp_path / "big.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": answer}]}) + "\n"
    )
    assert path.stat().st_size > 50_000_000
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=300,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["length"] == 256
    assert result["peak_kib"] < 1024 * 1024, f"peak RSS {result['peak_kib'] / 1024:.0f} MiB"
