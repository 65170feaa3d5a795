"""``lmloss train`` on the command line: help, errors that say what to do, a local model directory."""

from __future__ import annotations

import json

import pytest

from lmloss.cli import main
from lmloss.train.builtin import build_model, build_tokenizer


def test_help_explains_every_group(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for group in ("model and data", "batches and steps", "optimizer", "loss", "hardware", "run directory"):
        assert group in text
    assert "torchrun" in text and "(default: " in text


@pytest.mark.parametrize("argv, message", [
    (["--data", "missing.jsonl"], "data file 'missing.jsonl' does not exist"),
    (["--model", "no/such/dir"], "neither a built-in size"),
    (["--max-steps", "3", "--epochs", "1"], "conflict"),
])
def test_errors_exit_2_with_a_message(tmp_path, capsys, argv, message):
    code = main(["train", "--output-dir", str(tmp_path / "run"), "--progress", "none", *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_bad_line_is_reported_with_its_number(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    assert main(["train", "--data", str(data), "--output-dir", str(tmp_path / "run"), "--model", "tiny"]) == 2
    assert f"{data}:2: not valid JSON" in capsys.readouterr().err


def test_local_model_directory_and_prompt_completion_data(tmp_path, capsys):
    texts = ["What is 2 plus 2?", "It is 4.", "What is 3 plus 3?", "It is 6."]
    tokenizer = build_tokenizer(texts * 4, vocab_size=300)
    model = build_model(len(tokenizer), "tiny")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."}) + "\n"
                            for i in range(1, 9)))
    run = tmp_path / "run"
    code = main(["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(run), "--max-steps",
                 "3", "--batch-size", "2", "--grad-accum", "1", "--eval-fraction", "0.25", "--progress", "none",
                 "--samples", "1", "--max-new-tokens", "2"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["first_eval_loss"] is not None
    samples = json.loads((run / "samples.json").read_text())
    assert samples["after"][0]["prompt"].startswith("What is")


def test_resume_refuses_a_flag_set_to_its_default_that_differs_from_the_run(tmp_path, capsys):
    """--lr 0.003 is the default, but the run was made with 0.01: set explicitly, it differs."""
    run = tmp_path / "run"
    flags = ["train", "--output-dir", str(run), "--model", "tiny", "--vocab-size", "300", "--max-steps", "1",
             "--batch-size", "2", "--grad-accum", "1", "--samples", "0", "--progress", "none", "--eval-every", "1"]
    assert main([*flags, "--lr", "0.01"]) == 0
    assert main(["train", "--output-dir", str(run), "--resume", "--lr", "0.003"]) == 2
    assert "--lr" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(run), "--resume", "--max-steps", "2", "--progress", "none"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2
