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
    with pytest.raises(ValueError, match="d.jsonl: has no samples: the file is empty"):
        records(tmp_path, [])


def test_non_json_line_names_its_line(tmp_path):
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        records(tmp_path, [CHAT, "{oops", CHAT])


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "user", "content": "Hi?"}]}, "has no assistant turn"),
    ({"messages": [{"role": "human", "content": "Hi?"}, {"role": "gpt", "content": "Yo."}]}, "not a known role"),
])
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
