"""``lmloss train`` on the command line: help, errors that say what to do, a local model directory."""

from __future__ import annotations

import json
from pathlib import Path

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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "missing.jsonl"], "data file 'missing.jsonl' does not exist"),
        (["--model", "no/such/dir"], "neither a built-in size"),
        (["--max-steps", "3", "--epochs", "1"], "conflict"),
    ],
)
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
    data.write_text(
        "".join(
            json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."}) + "\n"
            for i in range(1, 9)
        )
    )
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--output-dir",
            str(run),
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--grad-accum",
            "1",
            "--eval-fraction",
            "0.25",
            "--progress",
            "none",
            "--samples",
            "1",
            "--max-new-tokens",
            "2",
        ]
    )
    assert code == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["first_eval_loss"] is not None
    samples = json.loads((run / "samples.json").read_text())
    assert samples["after"][0]["prompt"].startswith("What is")


def test_resume_refuses_a_flag_set_to_its_default_that_differs_from_the_run(tmp_path, capsys):
    """--lr 0.003 is the default, but the run was made with 0.01: set explicitly, it differs."""
    run = tmp_path / "run"
    flags = [
        "train",
        "--output-dir",
        str(run),
        "--model",
        "tiny",
        "--vocab-size",
        "300",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--samples",
        "0",
        "--progress",
        "none",
        "--eval-every",
        "1",
    ]
    assert main([*flags, "--lr", "0.01"]) == 0
    assert main(["train", "--output-dir", str(run), "--resume", "--lr", "0.003"]) == 2
    assert "--lr" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(run), "--resume", "--max-steps", "2", "--progress", "none"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2


# --- every failure one line: exit 2 for bad input, 1 for a failed run, a traceback only with --debug


def _tiny(run, *extra: str) -> list[str]:
    return [
        "train",
        "--output-dir",
        str(run),
        "--model",
        "tiny",
        "--vocab-size",
        "300",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--samples",
        "0",
        "--progress",
        "none",
        "--eval-every",
        "100",
        *extra,
    ]


def one_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_output_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    assert main(_tiny(target)) == 2
    one_line(capsys.readouterr().err, "lmloss train: error:", "--output-dir", str(target), "is a file")


def _read_only(monkeypatch, directory):
    """Files cannot be made in ``directory`` (simulated: the tests may run as root, whom
    permission bits do not stop)."""
    import errno
    import tempfile

    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == Path(directory).resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / "x"))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_read_only_output_dir(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    _read_only(monkeypatch, run)
    assert main(_tiny(run)) == 2
    one_line(capsys.readouterr().err, "--output-dir", str(run), "cannot be written: Permission denied")


@pytest.mark.parametrize("where", ["safetensors", "torch.save", "summary"])
def test_full_disk_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch, where):
    import errno

    import transformers.modeling_utils
    from safetensors import SafetensorError

    from lmloss.train import checkpoint, report

    def full(*args, **kwargs):
        if where == "safetensors":
            raise SafetensorError(
                "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                'message: "No space left on device" })'
            )
        if where == "torch.save":
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . unexpected pos 512 vs 448\n"
                "frame #0: c10::ThrowEnforceNotMet"
            )
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / ".summary.json.tmp"))

    if where == "safetensors":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    elif where == "torch.save":
        monkeypatch.setattr(checkpoint.torch, "save", full)
    else:
        monkeypatch.setattr(report, "atomic_write", full)
    assert main(_tiny(tmp_path / "run")) == 1
    err = capsys.readouterr().err
    if where == "summary":
        one_line(err, "lmloss train: error:", ".summary.json.tmp: No space left on device")
    else:
        line = one_line(err, "lmloss train: error: could not write checkpoint", "step-0000002")
        assert ("No space left" if where == "safetensors" else "enforce fail") in line
        assert not list((tmp_path / "run" / "checkpoints").glob(".step-*"))  # no half checkpoint left


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    target = tmp_path / "afile"
    target.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        main([*_tiny(target), "--debug"])
    monkeypatch.setenv("LMLOSS_DEBUG", "1")
    with pytest.raises(ValueError, match="is a file"):
        main(_tiny(target))


@pytest.mark.parametrize("damage", ["trainer_state.pt", "model.safetensors"])
def test_damaged_checkpoint_on_resume(tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert main(_tiny(run)) == 0
    path = run / "checkpoints" / "step-0000002" / damage
    if damage == "trainer_state.pt":
        path.write_bytes(path.read_bytes()[:100])  # cut: a corrupt zip
    else:
        path.write_bytes(b"")  # empty
    capsys.readouterr()
    assert main(["train", "--output-dir", str(run), "--resume", "--max-steps", "3", "--progress", "none"]) == 2
    one_line(capsys.readouterr().err, "lmloss train: error:", str(path), "resume from an earlier checkpoint")


def test_plot_out_read_only_or_a_file(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "train/loss": 2.0}\n')
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["plot", str(run), "--out", str(afile)]) == 2
    one_line(capsys.readouterr().err, "lmloss plot: error:", "--out", str(afile), "is a file")
    out = tmp_path / "out"
    out.mkdir()
    _read_only(monkeypatch, out)
    assert main(["plot", str(run), "--out", str(out)]) == 2
    one_line(capsys.readouterr().err, "lmloss plot: error:", "--out", str(out), "Permission denied")


def test_without_matplotlib_the_run_warns_and_still_writes_summary_and_report(tmp_path):
    """The reproduction: every step ran, then plot_run raised ImportError and neither
    summary.json nor report.md was written. Here ``import matplotlib`` fails in the child."""
    import os
    import subprocess
    import sys

    shim = tmp_path / "shim"
    (shim / "matplotlib").mkdir(parents=True)
    (shim / "matplotlib" / "__init__.py").write_text("raise ImportError('No module named matplotlib (test shim)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "lmloss.cli", *_tiny(run)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "matplotlib is not installed" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["interrupted"] is None
    assert "## Loss" in (run / "report.md").read_text() and not (run / "plots").exists()
