"""The run directory: --overwrite deletes only a run's own files, one run at a time, a
``latest`` that stays inside ``checkpoints/``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmloss.cli import main
from lmloss.train import checkpoint as ckpt
from lmloss.train import rundir
from lmloss.train.config import TrainConfig
from lmloss.train.loop import train

TINY = dict(
    model="tiny", vocab_size=300, batch_size=4, grad_accum=1, max_length=96, samples=0, progress="none", eval_every=100
)


def tiny(run: Path, **changes: object) -> TrainConfig:
    return TrainConfig(**{**TINY, "output_dir": str(run), **changes})


def quiet(_: str) -> None:
    pass


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_overwrite_refuses_a_model_directory_and_deletes_nothing(tmp_path):
    """The reproduction: a transformers model directory (config.json, weights, notes/) was rmtree'd."""
    model = tmp_path / "model"
    (model / "notes").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "precious.safetensors").write_bytes(b"weights")
    (model / "notes" / "todo.txt").write_text("keep me")
    before = tree(model)
    with pytest.raises(rundir.RunDirError, match=r"--overwrite: .*\(notes/, precious\.safetensors\)"):
        train(tiny(model, max_steps=1, overwrite=True), log=quiet)
    assert tree(model) == before  # nothing deleted, no lock left behind


def test_overwrite_deletes_exactly_a_runs_own_files(tmp_path):
    run = tmp_path / "run"
    train(tiny(run, max_steps=2), log=quiet)
    written = {p.name for p in run.iterdir()}
    assert written <= rundir.RUN_FILES and {"config.json", "metrics.jsonl", "checkpoints", "summary.json"} <= written
    # A stray file inside a folder the run owns is not the run's either.
    (run / "plots" / "mine.txt").write_text("mine")
    with pytest.raises(rundir.RunDirError, match=r"plots/mine\.txt"):
        train(tiny(run, max_steps=2, overwrite=True), log=quiet)
    assert (run / "plots" / "mine.txt").is_file() and (run / "checkpoints").is_dir()
    (run / "plots" / "mine.txt").unlink()
    (run / "metrics.jsonl").write_text('{"step": 77, "split": "train", "train/loss": 1.0}\n')
    summary = train(tiny(run, max_steps=1, overwrite=True), log=quiet)
    assert summary["steps"] == 1
    assert {json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()} == {0, 1}


def test_a_second_run_into_a_locked_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = rundir.RunLock(run)
    lock.acquire()  # held by this (live) process, as by a run in progress
    try:
        with pytest.raises(rundir.RunDirError, match=rf"in use by another lmloss run \(pid {os.getpid()}\)"):
            train(tiny(run, max_steps=1), log=quiet)
        assert not (run / "config.json").exists()
    finally:
        lock.release()
    assert not (run / rundir.LOCK_FILE).exists()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid names no process now
    (run / rundir.LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename}))
    assert train(tiny(run, max_steps=1), log=quiet)["steps"] == 1
    assert not (run / rundir.LOCK_FILE).exists()  # released at the end


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path):
    """The lock's pid is alive, but it is another process (started at another time)."""
    import socket

    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": 1}))
    lock = rundir.RunLock(run)
    lock.acquire()
    assert json.loads((run / rundir.LOCK_FILE).read_text())["started"] != 1
    lock.release()


@pytest.mark.parametrize("output_dir", ["", "  "])
def test_an_empty_output_dir_is_refused(tmp_path, capsys, monkeypatch, output_dir):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--output-dir", output_dir, "--max-steps", "1"]) == 2
    assert "--output-dir is empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_latest_must_name_a_checkpoint_inside_checkpoints(tmp_path):
    run = tmp_path / "a" / "b" / "run"
    train(tiny(run, max_steps=1), log=quiet)
    elsewhere = tmp_path / "a" / "b" / "elsewhere" / "step-3"
    shutil.copytree(ckpt.latest_checkpoint(run), elsewhere)  # a complete checkpoint, outside the run
    (run / "checkpoints" / "latest").write_text("../../elsewhere/step-3\n")
    assert (run / "checkpoints" / "../../elsewhere/step-3").resolve() == elsewhere.resolve()
    with pytest.raises(ValueError, match=r"names '\.\./\.\./elsewhere/step-3', not a checkpoint inside"):
        train(TrainConfig(output_dir=str(run), resume=True, max_steps=2, progress="none"), log=quiet)
    with pytest.raises(ValueError, match="not a checkpoint inside"):
        ckpt.latest_checkpoint(run)
    (run / "checkpoints" / "latest").write_text("step-0000001\n")
    assert ckpt.latest_checkpoint(run) == run / "checkpoints" / "step-0000001"
