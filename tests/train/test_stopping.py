"""Ctrl-C and SIGTERM stop ``lmloss train`` cleanly: the step in flight ends, a checkpoint
is saved, the summary and report say so, exit status 128 + signal, and ``--resume``
continues exactly (a real process, a real signal)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmloss.monitor.sinks import read_jsonl
from lmloss.train import checkpoint as ckpt
from lmloss.train.stopping import StopRequest, exit_code

STEPS = 400  # far more than run before the signal lands: the run cannot end on its own first


def _cmd(run: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lmloss.cli",
        "train",
        "--output-dir",
        str(run),
        "--model",
        "tiny",
        "--vocab-size",
        "300",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--max-length",
        "64",
        "--samples",
        "0",
        "--progress",
        "none",
        "--eval-every",
        "1000",
        "--save-every",
        "1000",
        "--max-steps",
        str(STEPS),
        *extra,
    ]


def _train_losses(run: Path) -> dict[int, float]:
    if not (run / "metrics.jsonl").is_file():
        return {}
    return {r["step"]: r["train/loss"] for r in read_jsonl(run / "metrics.jsonl").records if r["split"] == "train"}


def _logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_bytes().splitlines()) if path.is_file() else 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_reports_and_resumes_exactly(tmp_path, signum):
    run = tmp_path / "run"
    process = subprocess.Popen(_cmd(run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _logged_steps(run) < 3:  # a few steps in: the handlers are in place
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == exit_code(signum) == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum], err
    assert "Traceback" not in err

    summary = json.loads((run / "summary.json").read_text())
    stopped = summary["interrupted"]["step"]
    assert summary["interrupted"]["signal"] == signal.Signals(signum).name
    assert 3 <= stopped < STEPS and summary["steps"] == stopped
    assert sorted(_train_losses(run)) == list(range(1, stopped + 1))  # the step in flight ended and was logged
    assert ckpt.latest_checkpoint(run) == run / "checkpoints" / f"step-{stopped:07d}"
    assert f"**Interrupted** by {signal.Signals(signum).name} after step {stopped}" in (run / "report.md").read_text()

    # Resumed (--max-steps stays STEPS: the schedule depends on it) and stopped again three
    # steps later, the losses are those of an uninterrupted run, to the bit (float32, CPU).
    target = stopped + 3
    process = subprocess.Popen(_cmd(run, "--resume"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while max(_train_losses(run), default=0) < target:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline + 120
        time.sleep(0.02)
    process.send_signal(signum)
    process.communicate(timeout=120)
    assert process.returncode == exit_code(signum)
    interrupted = _train_losses(run)

    whole = tmp_path / "whole"
    last = max(interrupted)
    process = subprocess.Popen(_cmd(whole), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while max(_train_losses(whole), default=0) < last:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline + 240
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    uninterrupted = _train_losses(whole)
    assert {s: interrupted[s] for s in range(1, last + 1)} == {s: uninterrupted[s] for s in range(1, last + 1)}


def test_a_second_signal_stops_at_once():
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
