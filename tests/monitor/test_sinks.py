"""Sinks: crash-safe JSONL, CSV, TensorBoard, the console bar."""

from __future__ import annotations

import csv
import io
import json
import math
import os

import pytest
from test_monitor import FakeClock, eventful_calls, feed

from lmloss.monitor import (
    ConsoleSink,
    CsvSink,
    Event,
    JsonlSink,
    LossMonitor,
    TensorBoardSink,
    read_jsonl,
    run_dir_sinks,
)

RECORDS = [
    {"step": 0, "split": "train", "train/loss": 2.5, "train/tokens": 10},
    {"step": 1, "split": "train", "train/loss": float("nan")},
    {
        "step": 1,
        "split": "train",
        "event": "nan",
        "metric": "train/loss",
        "value": float("nan"),
        "threshold": None,
        "message": "step 1: non-finite train value(s): train/loss=nan",
    },
    {"step": 2, "split": "eval", "eval/loss": 2.7, "note": "ünïcode"},
]


# --- JSONL -----------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path):
    sink = JsonlSink(tmp_path / "run" / "metrics.jsonl")
    for record in RECORDS:
        sink.write(record)
    sink.close()
    log = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert log.skipped == []
    assert json.dumps(log.records) == json.dumps([RECORDS[0], RECORDS[1], RECORDS[3]])
    assert log.events == [Event.from_record(RECORDS[2])] and math.isnan(log.events[0].value)


def test_jsonl_writes_each_record_as_one_whole_line(tmp_path, monkeypatch):
    writes: list[bytes] = []
    real_write = os.write

    def spy(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    fsyncs: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd))
    sink = JsonlSink(tmp_path / "metrics.jsonl", fsync=True)
    for record in RECORDS:
        sink.write(record)
        # Written at once, not buffered: a reader sees the record right away.
        assert (tmp_path / "metrics.jsonl").read_bytes().endswith(writes[-1])
    sink.close()
    assert len(writes) == len(RECORDS) == len(fsyncs)
    assert all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)


def test_a_line_cut_by_a_crash_is_skipped_and_reported(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    for record in RECORDS:
        sink.write(record)
    sink.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 15])  # the crash: the last record loses its end
    log = read_jsonl(path)
    assert [r["step"] for r in log.records] == [0, 1] and len(log.events) == 1
    (skipped,) = log.skipped
    assert skipped.line == 4 and "truncated last line" in skipped.reason
    assert skipped.describe(path).startswith(f"skipped {path}:4: truncated last line")
    # The resumed run appends: the cut line stays one bad line, the new record is whole.
    resumed = JsonlSink(path)
    resumed.write({"step": 2, "split": "eval", "eval/loss": 2.6})
    resumed.close()
    log = read_jsonl(path)
    assert [r["step"] for r in log.records] == [0, 1, 2] and log.records[-1]["eval/loss"] == 2.6
    assert [(s.line, s.reason.split(" (")[0]) for s in log.skipped] == [(4, "not valid JSON")]


def test_reader_skips_what_is_not_a_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 0, "split": "train", "train/loss": 1.0}\n'
        "[1, 2]\n"
        '{"split": "train"}\n'
        '{"step": 1, "split": "test"}\n'
        '{"step": 1, "split": "train", "event": "boom", "message": "", "metric": "", "value": 1}\n'
        "\n"
        '{"step": 2, "split": "train", "train/loss": 0.5}'  # complete, only the newline is missing
    )
    log = read_jsonl(path)
    assert [r["step"] for r in log.records] == [0, 2]
    assert [s.line for s in log.skipped] == [2, 3, 4, 5]
    assert "unknown split 'test'" in log.skipped[2].reason and "unknown event kind" in log.skipped[3].reason


def test_monitor_to_jsonl_and_back(tmp_path):
    monitor = LossMonitor(sinks=run_dir_sinks(tmp_path), clock=FakeClock())
    feed(monitor, eventful_calls())
    monitor.close()
    log = read_jsonl(tmp_path / "metrics.jsonl")
    assert log.events == monitor.events and log.skipped == []
    assert len([r for r in log.records if r["split"] == "train"]) == 1000
    assert {
        "train/loss",
        "train/loss_smoothed",
        "train/ppl",
        "train/grad_norm",
        "train/lr",
        "throughput/tokens_per_s",
        "train/term/ce",
    } <= set(log.records[5])


def test_sink_that_never_writes_creates_no_file(tmp_path):
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.close()
    assert not (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(TypeError, match="fsync must be a bool"):
        JsonlSink(tmp_path / "x.jsonl", fsync=1)  # type: ignore[arg-type]  # a wrong type on purpose
    with pytest.raises(TypeError, match="record must be a mapping"):
        JsonlSink(tmp_path / "x.jsonl").write([1])  # type: ignore[arg-type]  # a wrong type on purpose


# --- CSV -------------------------------------------------------------------------------------


def test_csv_widens_its_header_and_skips_events(tmp_path):
    path = tmp_path / "metrics.csv"
    sink = CsvSink(path)
    for record in RECORDS:
        sink.write(record)
    sink.close()
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["step", "split", "train/loss", "train/tokens", "eval/loss", "note"]
    assert [(r["step"], r["split"], r["train/loss"], r["eval/loss"]) for r in rows] == [
        ("0", "train", "2.5", ""),
        ("1", "train", "nan", ""),
        ("2", "eval", "", "2.7"),
    ]
    # Resuming keeps the header; no temporary file is left behind.
    resumed = CsvSink(path)
    resumed.write({"step": 3, "split": "train", "train/loss": 2.0})
    resumed.close()
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[-1]["train/loss"] == "2.0" and rows[-1]["note"] == "" and len(rows) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


# --- TensorBoard -----------------------------------------------------------------------------


def test_tensorboard_scalars_and_event_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "tb")
    for record in RECORDS:
        sink.write(record)
    sink.close()
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    assert {"train/loss", "train/tokens", "eval/loss"} <= set(accumulator.Tags()["scalars"])
    assert [(e.step, e.value) for e in accumulator.Scalars("eval/loss")] == [(2, pytest.approx(2.7))]
    assert [e.step for e in accumulator.Scalars("train/loss")] == [0, 1]
    assert "events/nan/text_summary" in accumulator.Tags()["tensors"]


# --- console ---------------------------------------------------------------------------------


def _train(step: int, loss: float) -> dict:
    return {
        "step": step,
        "split": "train",
        "train/loss": loss,
        "train/loss_smoothed": loss,
        "throughput/tokens_per_s": 18250.0,
    }


@pytest.mark.parametrize("backend", ["rich", "tqdm", "plain"])
def test_console_shows_progress_and_prints_events(backend):
    out = io.StringIO()
    sink = ConsoleSink(total_steps=100, backend=backend, every=10, file=out)
    for step in range(11):
        sink.write(_train(step, 2.0 - 0.01 * step))
    sink.write({"step": 10, "split": "eval", "eval/loss": 2.25})
    sink.write({"step": 10, "split": "train", "event": "spike", "message": "step 10: train/loss spiked [x]"})
    sink.write(_train(11, 1.5))
    sink.close()
    text = out.getvalue()
    assert "step 10: train/loss spiked [x]" in text  # markup-like text is printed as is
    # Not a terminal: rich draws the final state only, tqdm every update, plain every 10 steps.
    assert ("loss 1.9000" if backend == "plain" else "loss 1.5000 · ppl 4.482") in text
    if backend == "rich":  # 80 columns: the metrics are cut short, the step and the ETA are not
        assert "step  11/100" in text and "eta 0:00:" in text and text.count("\n") == 2
    else:
        assert "18.2k tok/s" in text
    if backend == "tqdm":
        assert "eval 2.2500" in text


def test_console_checks_its_arguments():
    with pytest.raises(ValueError, match="backend='curses'"):
        ConsoleSink(backend="curses")
    with pytest.raises(TypeError, match="total_steps"):
        ConsoleSink(total_steps=1.5)  # type: ignore[arg-type]  # a wrong type on purpose
