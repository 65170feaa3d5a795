"""``lmloss check``: the JSONL reader, ``audit`` and the command, on a real local tokenizer.

Expected numbers are worked out from the tokenizer's own token ids (how many tokens
the answer is, where the prompt ends), never from the code under test.
"""

from __future__ import annotations

import json

import pytest

from lmloss.check import AuditReport, Record, audit, read_jsonl_records, read_jsonl_samples
from lmloss.cli import main

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."
GOOD_CHAT = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
NO_ASSISTANT = {"messages": [{"role": "user", "content": QUESTION}]}
UNKNOWN_ROLE = {"messages": [{"role": "human", "content": QUESTION}, {"role": "gpt", "content": ANSWER}]}


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _write(path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, chatml_tokenizer) -> str:
    """The ChatML tokenizer saved to disk, as ``--tokenizer`` wants it."""
    path = tmp_path_factory.mktemp("tokenizer")
    chatml_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def chat_layout(chatml_tokenizer) -> dict[str, int]:
    """Token counts of GOOD_CHAT, from the rendered text: whole, prompt part, answer part."""
    full = chatml_tokenizer.apply_chat_template(GOOD_CHAT["messages"], tokenize=False)
    prompt = chatml_tokenizer.apply_chat_template(GOOD_CHAT["messages"][:1], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt) and full.endswith(ANSWER + "<|im_end|>\n")
    # The answer is its content plus <|im_end|> (one special token); the final "\n"
    # is scaffolding. "assistant\n" does not merge with "The" under this BPE.
    answer = len(_ids(chatml_tokenizer, ANSWER)) + 1
    return {"total": len(_ids(chatml_tokenizer, full)), "prompt": len(_ids(chatml_tokenizer, prompt)), "answer": answer}


# ------------------------------------------------------------------------- reader


def test_reader_keeps_line_numbers_and_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD_CHAT) + "\n\n" + json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    records = read_jsonl_records(path)
    assert [r.line for r in records] == [1, 3]
    assert records[1].where == f"{path}:3"
    assert read_jsonl_samples(path) == [GOOD_CHAT, {"prompt": "a", "completion": "b"}]


@pytest.mark.parametrize(
    "lines, line, phrase",
    [
        ([json.dumps(GOOD_CHAT), "{not json"], 2, "not valid JSON"),
        (["[1, 2]"], 1, "expected a JSON object"),
        ([json.dumps(GOOD_CHAT), json.dumps(GOOD_CHAT), '{"text": "hi"}'], 3, "needs 'messages'"),
    ],
)
def test_reader_names_file_and_line(tmp_path, lines, line, phrase):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=phrase) as info:
        read_jsonl_samples(path)
    assert f"bad.jsonl:{line}:" in str(info.value)


def test_reader_rejects_an_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: has no samples"):
        read_jsonl_samples(path)


# -------------------------------------------------------------------------- audit


def test_supervised_fraction_of_a_known_chat(chatml_tokenizer, chat_layout):
    report = audit([GOOD_CHAT], chatml_tokenizer)
    assert chat_layout["answer"] == 9  # 8 content tokens + <|im_end|>
    assert report.lengths == [chat_layout["total"]]
    assert report.fractions == [pytest.approx(chat_layout["answer"] / chat_layout["total"])]
    assert report.ok and report.issues == []


def test_supervised_fraction_of_prompt_completion(chatml_tokenizer):
    prompt, completion = "Translate the word cat into French.", "The French word for cat is chat."
    n_prompt, n_completion = len(_ids(chatml_tokenizer, prompt)), len(_ids(chatml_tokenizer, completion))
    report = audit([{"prompt": prompt, "completion": completion}], chatml_tokenizer)
    total = n_prompt + n_completion + 1  # + the EOS, which is a target
    assert report.lengths == [total]
    assert report.fractions == [pytest.approx((n_completion + 1) / total)]


def test_truncation_no_target_and_cut_answers(chatml_tokenizer, chat_layout):
    prompt = chat_layout["total"] - chat_layout["answer"] - 1  # tokens before the answer
    assert prompt == chat_layout["prompt"]
    samples = [GOOD_CHAT] * 3
    # Keeping exactly the prompt cuts every target; one more token keeps one target.
    no_target = audit(samples, chatml_tokenizer, max_length=prompt)
    assert no_target.count("no_target") == 3 and no_target.count("cut") == 0 and not no_target.ok
    cut = audit(samples, chatml_tokenizer, max_length=prompt + 1)
    assert cut.count("cut") == 3 and cut.count("no_target") == 0 and cut.ok
    assert cut.fractions == [pytest.approx(1 / (prompt + 1))] * 3
    assert f"{chat_layout['answer'] - 1} of {chat_layout['answer']} targets" in cut.warnings[0].message
    # The trailing "\n" is not a target: cutting only it cuts no answer.
    whole = audit(samples, chatml_tokenizer, max_length=chat_layout["total"] - 1)
    assert whole.issues == []


def test_bad_samples_are_reported_not_raised(chatml_tokenizer):
    records = [Record("x.jsonl", 1, GOOD_CHAT), Record("x.jsonl", 2, NO_ASSISTANT), Record("x.jsonl", 3, UNKNOWN_ROLE)]
    report = audit(records, chatml_tokenizer)
    assert report.num_samples == 3 and len(report.lengths) == 1
    assert [(i.kind, i.where) for i in report.errors] == [("encode", "x.jsonl:2"), ("encode", "x.jsonl:3")]
    assert "no assistant turn" in report.errors[0].message
    assert "'human' is not a known role" in report.errors[1].message


def test_pretokenized_eos_masked_when_pad_is_eos(plain_tokenizer):
    eos = plain_tokenizer.eos_token_id
    assert plain_tokenizer.pad_token_id == eos
    # The TRL #1623 bug: labels[input_ids == pad] = -100 also masks the answer's EOS.
    bad = {"input_ids": [5, 6, 7, 8, eos, eos], "labels": [-100, -100, 7, 8, -100, -100]}
    good = {"input_ids": [5, 6, 7, 8, eos, eos], "labels": [-100, -100, 7, 8, eos, -100]}
    report = audit([bad, good], plain_tokenizer)
    assert report.pad_is_eos
    assert [(i.kind, i.where) for i in report.errors] == [("eos_masked", "sample 0")]
    assert "position 4" in report.errors[0].message and "pad_token_id == eos_token_id" in report.errors[0].message


def test_pretokenized_end_of_turn_masked(chatml_tokenizer):
    im_end = chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    # An <|im_end|> inside the prompt is rightly masked: only the one after a trained span counts.
    ok = {"input_ids": [1, 5, im_end, 6, 7, im_end], "labels": [-100, -100, -100, 6, 7, im_end]}
    bad = {"input_ids": [1, 5, im_end, 6, 7, im_end], "labels": [-100, -100, -100, 6, 7, -100]}
    report = audit([ok, bad], chatml_tokenizer)
    assert [(i.kind, i.where) for i in report.errors] == [("eos_masked", "sample 1")]


def test_placeholder_target_detected(chatml_tokenizer):
    image = chatml_tokenizer.convert_tokens_to_ids("<|image_pad|>")
    sample = {"input_ids": [5, image, image, 8], "labels": [-100, image, image, 8]}
    report = audit([sample], chatml_tokenizer, ignore_token_ids=[image])
    assert [i.kind for i in report.errors] == ["placeholder_target"]
    assert "2 position(s)" in report.errors[0].message
    # Encoders mask placeholders themselves, so encoded samples never trip this.
    chat = {"messages": [{"role": "user", "content": "<|image_pad|>Describe the image"},
                         {"role": "assistant", "content": "A cat<|image_pad|>"}]}  # fmt: skip
    assert audit([chat], chatml_tokenizer, ignore_token_ids=[image]).issues == []


def test_shifted_labels_warn(chatml_tokenizer):
    report = audit([{"input_ids": [5, 6, 7, 8], "labels": [6, 7, 8, -100]}], chatml_tokenizer)
    assert [i.kind for i in report.warnings] == ["label_mismatch"] and report.ok


def test_histogram_uses_power_of_two_buckets():
    report = AuditReport(lengths=[1, 3, 4, 17, 64])
    assert report.histogram() == [(1, 1, 1), (2, 2, 0), (3, 4, 2), (5, 8, 0), (9, 16, 0), (17, 32, 1), (33, 64, 1)]


def test_audit_rejects_bad_options(chatml_tokenizer):
    with pytest.raises(ValueError, match="mode"):
        audit([], chatml_tokenizer, mode="assistants")
    with pytest.raises(ValueError, match="max_length"):
        audit([], chatml_tokenizer, max_length=0)
    with pytest.raises(TypeError, match="ignore_token_ids"):
        audit([], chatml_tokenizer, ignore_token_ids="151655")


# ---------------------------------------------------------------------------- CLI


def test_cli_clean_data_exits_zero(tmp_path, tok_dir, capsys):
    data = _write(tmp_path / "good.jsonl", [GOOD_CHAT, {"prompt": "Hello", "completion": "Hi there."}])
    assert main(["check", data, "--tokenizer", tok_dir]) == 0
    out = capsys.readouterr().out
    assert "2 samples, 2 encoded" in out and "OK: 0 error(s)" in out and "sequence length" in out


def test_cli_reports_every_bad_line_and_exits_one(tmp_path, tok_dir, capsys):
    data = _write(tmp_path / "mixed.jsonl", [GOOD_CHAT, NO_ASSISTANT, UNKNOWN_ROLE, "{oops"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["check", data, str(empty), "--tokenizer", tok_dir]) == 1
    out = capsys.readouterr().out
    assert "mixed.jsonl:2: skipped, cannot encode:" in out and "no assistant turn" in out
    assert "mixed.jsonl:3: skipped, cannot encode:" in out and "not a known role" in out
    assert "mixed.jsonl:4: not valid JSON" in out
    assert "empty.jsonl: has no samples" in out
    assert "5 samples, 1 encoded" in out and "FAILED: 4 error(s)" in out


def test_cli_json_and_max_errors(tmp_path, tok_dir, chat_layout, capsys):
    data = _write(tmp_path / "d.jsonl", [GOOD_CHAT] * 4)
    argv = ["check", data, "--tokenizer", tok_dir, "--max-length", str(chat_layout["prompt"])]
    assert main([*argv, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["no_target"] == 4 and report["ok"] is False
    assert [e["where"] for e in report["errors"]] == [f"{data}:{n}" for n in (1, 2, 3, 4)]
    assert main([*argv, "--max-errors", "2"]) == 1
    out = capsys.readouterr().out
    assert "errors (first 2 of 4):" in out and f"{data}:3" not in out


def test_cli_placeholder_ids_option(tmp_path, tok_dir, chatml_tokenizer, capsys):
    image = chatml_tokenizer.convert_tokens_to_ids("<|image_pad|>")
    data = _write(tmp_path / "pre.jsonl", [{"input_ids": [5, image, 8], "labels": [-100, image, 8]}])
    assert main(["check", data, "--tokenizer", tok_dir]) == 0
    capsys.readouterr()
    assert main(["check", data, "--tokenizer", tok_dir, "--ignore-token-ids", f"{image},9999"]) == 1
    assert f"pre.jsonl:1: placeholder token {image} is a target" in capsys.readouterr().out


def test_cli_missing_tokenizer_dir(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", [GOOD_CHAT])
    assert main(["check", data, "--tokenizer", str(tmp_path / "no-such-tokenizer")]) == 2
    err = capsys.readouterr().err
    assert "no-such-tokenizer" in err and "does not exist" in err


# ---------------------------------------------------------------------- hardening


def test_check_refuses_exactly_what_train_refuses(tmp_path, tok_dir, chatml_tokenizer, capsys):
    # Reproduction: ids outside the vocabulary passed `lmloss check` with 0 errors and
    # crashed `lmloss train` with an IndexError; 1.9 was refused by check, truncated by train.
    from lmloss.train.config import TrainConfig
    from lmloss.train.data import DataReport, encode_records, load_records

    vocab = len(chatml_tokenizer)
    ok = _ids(chatml_tokenizer, ANSWER)
    rows = [
        {"input_ids": ok, "labels": ok},
        {"input_ids": ok + [vocab], "labels": ok + [-100]},
        {"input_ids": ok, "labels": ok[:-1] + [vocab + 5]},
        {"input_ids": ok[:-1] + [1.9], "labels": ok},
        {"input_ids": ok[:-1] + [True], "labels": ok},
        {"input_ids": ok[:-1] + [2**64], "labels": ok},
        {"input_ids": ok, "labels": ok[:-1] + [-1]},
        GOOD_CHAT,
    ]
    data = _write(tmp_path / "pre.jsonl", rows)
    assert main(["check", data, "--tokenizer", tok_dir, "--json"]) == 1
    flagged = {e["where"] for e in json.loads(capsys.readouterr().out)["errors"]}
    config = TrainConfig(data=[data], eval_fraction=0.0, skip_bad_samples=True)
    (source,), _ = load_records(config)
    report = DataReport()
    encode_records(source.records, chatml_tokenizer, config, report, "train")
    refused = {line.split(": ")[0] for line in report.skipped}
    assert flagged == refused == {f"{data}:{n}" for n in range(2, 8)}


def test_cli_counts_exactly_the_lines_with_invalid_utf8(tmp_path, tok_dir, capsys):
    # Reproduction: one 0xff byte made the whole file one unreadable line.
    path = tmp_path / "d.jsonl"
    good = json.dumps(GOOD_CHAT).encode()
    path.write_bytes(b"\n".join([good, good.replace(b"Paris", b"Par\xffis"), good, b"\xfe\xff{}", good]) + b"\n")
    assert main(["check", str(path), "--tokenizer", tok_dir, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 5 and report["num_encoded"] == 3 and report["counts"]["read"] == 2
    assert [(e["where"], e["message"][:20]) for e in report["errors"]] == [
        (f"{path}:2", "not valid UTF-8 (byt"),
        (f"{path}:4", "not valid UTF-8 (byt"),
    ]


def test_cli_deep_json_is_one_unreadable_line(tmp_path, tok_dir, capsys):
    data = _write(tmp_path / "d.jsonl", [GOOD_CHAT, "[" * 100_000 + "]" * 100_000, GOOD_CHAT])
    assert main(["check", data, "--tokenizer", tok_dir]) == 1
    out = capsys.readouterr().out
    assert f"{data}:2: JSON nested deeper than 100 levels" in out and "3 samples, 2 encoded" in out


def test_cli_negative_ignore_token_id_names_the_option(tmp_path, tok_dir, capsys):
    # Reproduction: `--ignore-token-ids -5` gave a ValueError traceback from audit().
    data = _write(tmp_path / "d.jsonl", [GOOD_CHAT])
    with pytest.raises(SystemExit) as info:
        main(["check", data, "--tokenizer", tok_dir, "--ignore-token-ids", "-5"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--ignore-token-ids" in err and "token ids are >= 0, got -5" in err and "Traceback" not in err


def _num(labels) -> int:
    return sum(label != -100 for label in labels)


def test_long_samples_are_audited_in_a_bounded_window(chatml_tokenizer, chat_layout):
    # A long answer past --max-length: the cut is reported (with lower bounds past the
    # audit window) and the kept tokens are those of the whole encoding.
    from lmloss.check import audit_window
    from lmloss.labels import encode_chat

    long_answer = {"messages": [GOOD_CHAT["messages"][0], {"role": "assistant", "content": ANSWER * 2000}]}
    max_length = chat_layout["prompt"] + 3
    report = audit([long_answer, GOOD_CHAT], chatml_tokenizer, max_length=max_length)
    whole = encode_chat(long_answer["messages"], chatml_tokenizer)
    assert len(whole["input_ids"]) > audit_window(max_length)
    [cut, short_cut] = [i for i in report.issues if i.kind == "cut"]
    assert cut.where == "sample 0" and "answer cut by truncation: at least" in cut.message
    assert short_cut.where == "sample 1" and "at least" not in short_cut.message
    assert report.lengths == [max_length, max_length]
    assert report.fractions[0] == _num(whole["labels"][1:max_length]) / max_length
    # Short enough for the window: exact counts, as before.
    report = audit([GOOD_CHAT], chatml_tokenizer, max_length=chat_layout["total"] - 2)  # cuts <|im_end|>, "\n"
    [cut] = [i for i in report.issues if i.kind == "cut"]
    assert f"1 of {chat_layout['answer']} targets beyond" in cut.message and "at least" not in cut.message


# ------------------------------------------------------- the options of lmloss train


def _train_fractions(path: str, tokenizer, **options) -> list[float]:
    """Supervised fraction of every sample as ``lmloss train`` encodes it."""
    from lmloss.train.config import TrainConfig
    from lmloss.train.data import DataReport, encode_records, load_records

    config = TrainConfig(data=[path], eval_fraction=0.0, max_length=4096, **options)
    (source,), _ = load_records(config)
    examples = encode_records(source.records, tokenizer, config, DataReport(), "train")
    return [_num(ex["labels"][1:]) / len(ex["input_ids"]) for ex in examples]


def test_train_turn_suffix_is_audited_as_train_encodes_it(tmp_path, tok_dir, chatml_tokenizer, chat_layout, capsys):
    # --train-turn-suffix (LLaMA-Factory's labels) also trains the "\n" after <|im_end|>.
    newline = len(_ids(chatml_tokenizer, "\n"))
    assert newline == 1
    report = audit([GOOD_CHAT], chatml_tokenizer, train_turn_suffix=True)
    assert report.fractions == [pytest.approx((chat_layout["answer"] + newline) / chat_layout["total"])]
    assert report.ok and report.train_turn_suffix
    two_turns = {"messages": GOOD_CHAT["messages"] * 2}
    data = _write(tmp_path / "d.jsonl", [GOOD_CHAT, two_turns])
    for mode in ("last_assistant", "all", "assistant"):
        ours = audit(read_jsonl_records(data), chatml_tokenizer, mode=mode, train_turn_suffix=True).fractions
        assert ours == _train_fractions(data, chatml_tokenizer, masking=mode, train_turn_suffix=True)
        assert ours != _train_fractions(data, chatml_tokenizer, masking=mode)
    assert main(["check", data, "--tokenizer", tok_dir, "--train-turn-suffix", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train_turn_suffix"] is True
    assert (out["supervised_fraction"]["min"], out["supervised_fraction"]["max"]) == (min(ours), max(ours))
    assert main(["check", data, "--tokenizer", tok_dir, "--train-turn-suffix"]) == 0
    assert "(mode=assistant, max_length=None, train_turn_suffix)" in capsys.readouterr().out
    with pytest.raises(TypeError, match="train_turn_suffix must be a bool"):
        audit([GOOD_CHAT], chatml_tokenizer, train_turn_suffix="yes")


def test_mode_all_trains_a_prompt_completion_pair_as_train_does(tmp_path, chatml_tokenizer):
    # Reproduction: `lmloss check --mode all` trained the prompt of prompt/completion
    # samples (fraction 0.96 here) while `lmloss train --masking all` trains only the
    # completion (0.42): --mode all is about chat turns, as in lmloss.encode_dataset.
    data = _write(
        tmp_path / "pc.jsonl",
        [{"prompt": "Translate the word cat into French.", "completion": "The French word for cat is chat."}],
    )
    for mode in ("assistant", "all", "last_assistant", "everything"):
        ours = audit(read_jsonl_records(data), chatml_tokenizer, mode=mode).fractions
        assert ours == _train_fractions(data, chatml_tokenizer, masking=mode)
    assert audit(read_jsonl_records(data), chatml_tokenizer, mode="all").fractions[0] < 0.5


def test_label_issue_messages(chatml_tokenizer):
    image = chatml_tokenizer.convert_tokens_to_ids("<|image_pad|>")
    im_end = chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    # One sample with all three label issues: one issue per kind, in this order.
    sample = {"input_ids": [5, 6, 7, im_end, image, 9], "labels": [-100, 7, 7, -100, image, -100]}
    report = audit([sample], chatml_tokenizer, ignore_token_ids=[image])
    assert [(i.severity, i.kind) for i in report.issues] == [
        ("error", "eos_masked"),
        ("error", "placeholder_target"),
        ("warning", "label_mismatch"),
    ]
    eos, placeholder, mismatch = (i.message for i in report.issues)
    assert eos == (
        f"EOS/end-of-turn token {im_end} at position 3 follows a trained span but is not a target; 1 such "
        "position(s). The model would never learn to stop: label it"
    )
    assert placeholder == (
        f"placeholder token {image} is a target at position 4 (1 position(s)); set those labels to -100 "
        "(lmloss.mask_token_ids)"
    )
    assert mismatch == (
        "1 label(s) differ from their input id (first at position 1); labels must be unshifted (the loss shifts "
        "them): were they shifted already?"
    )
