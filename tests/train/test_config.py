"""Options of ``lmloss train``: flags, config files, precedence, conflicts."""

from __future__ import annotations

import argparse

import pytest

from lmloss.train.config import DataSource, TrainConfig, add_arguments, config_from_args, parse_data_source


def parse(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_no_flags_is_the_default_config():
    assert parse() == TrainConfig()


def test_flags_map_to_fields():
    c = parse(
        "--max-steps",
        "7",
        "--no-packing",
        "--lr",
        "0.1",
        "--softcap",
        "30",
        "--data",
        "a.jsonl",
        "b.jsonl:2",
        "--precision",
        "bfloat16",
        "--masking",
        "last_assistant",
        "--batch-tokens",
        "2048",
        "--train-turn-suffix",
    )
    assert (c.max_steps, c.packing, c.lr, c.softcap, c.precision, c.masking, c.batch_tokens, c.train_turn_suffix) == (
        7,
        False,
        0.1,
        30.0,
        "bfloat16",
        "last_assistant",
        2048,
        True,
    )
    assert parse().train_turn_suffix is False
    assert c.sources == [DataSource("a.jsonl", 1.0), DataSource("b.jsonl", 2.0)]


@pytest.mark.parametrize(
    "suffix, text",
    [
        (".yaml", "max_steps: 9\nlr: 0.5\ndata:\n  - path: x.jsonl\n    weight: 0.5\n  - y.jsonl\npacking: false\n"),
        (".toml", 'max-steps = 9\nlr = 0.5\npacking = false\ndata = [{path = "x.jsonl", weight = 0.5}, "y.jsonl"]\n'),
        (
            ".json",
            '{"max_steps": 9, "lr": 0.5, "packing": false, "data": [{"path": "x.jsonl", "weight": 0.5}, "y.jsonl"]}',
        ),
    ],
)
def test_config_files(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    c = parse("--config", str(path))
    assert (c.max_steps, c.lr, c.packing) == (9, 0.5, False)
    assert c.sources == [DataSource("x.jsonl", 0.5), DataSource("y.jsonl", 1.0)]
    # Flags override the file; options the flags do not name keep the file's value.
    c = parse("--config", str(path), "--lr", "0.25")
    assert (c.max_steps, c.lr) == (9, 0.25)


def test_config_file_errors(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("max_step: 3\n")
    with pytest.raises(ValueError, match="unknown option 'max_step'"):
        parse("--config", str(bad_key))
    bad_type = tmp_path / "b.yaml"
    bad_type.write_text("lr: fast\n")
    with pytest.raises(ValueError, match="lr must be a float"):
        parse("--config", str(bad_type))
    broken = tmp_path / "c.yaml"
    broken.write_text("lr: [1\n")
    with pytest.raises(ValueError, match="could not be parsed"):
        parse("--config", str(broken))
    with pytest.raises(ValueError, match="does not exist"):
        parse("--config", str(tmp_path / "missing.yaml"))
    other = tmp_path / "d.ini"
    other.write_text("")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml, \.toml or \.json"):
        parse("--config", str(other))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-steps", "5", "--epochs", "2"], "--max-steps and --epochs conflict"),
        (["--resume", "--overwrite"], "--resume and --overwrite conflict"),
        (["--eval-data", "e.jsonl", "--eval-fraction", "0.1"], "--eval-data and --eval-fraction conflict"),
        (["--focal-gamma", "3"], "--focal-gamma is only used with --token-loss focal"),
        (
            ["--train-on-prompt", "--masking", "last_assistant"],
            "--train-on-prompt and --masking last_assistant conflict",
        ),
        (["--label-smoothing", "1.5"], r"--label-smoothing must be in \[0, 1\]"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["--max-steps", "0"], "--max-steps must be an integer >= 1"),
        (["--data", "a.jsonl:-1"], "weight after ':' must be a positive number"),
        (["--softcap", "-2"], "--softcap must be a positive number"),
    ],
)
def test_conflicts_and_bad_values_name_the_option(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(*argv)


def test_data_source_parsing():
    assert parse_data_source("d/x.jsonl") == DataSource("d/x.jsonl", 1.0)
    assert parse_data_source("d/x.jsonl:3") == DataSource("d/x.jsonl", 3.0)
    assert parse_data_source("C:/x.jsonl") == DataSource("C:/x.jsonl", 1.0)  # not a weight: part of the path


def test_none_values_and_help_lists_every_option():
    assert parse("--softcap", "none").softcap is None
    assert parse("--max-grad-norm", "0").max_grad_norm is None
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in text
