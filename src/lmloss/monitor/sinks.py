"""Where the monitor's records go: JSONL (the source of truth), CSV, TensorBoard.

**Run directory.** A run writes ``RUN_DIR/metrics.jsonl`` (``JsonlSink``), optionally
``RUN_DIR/metrics.csv`` (``CsvSink``) and ``RUN_DIR/tensorboard/``
(``TensorBoardSink``); ``lmloss plot RUN_DIR`` draws ``RUN_DIR/plots/*.png`` from the
JSONL file. ``run_dir_sinks(run_dir)`` builds that set.

**metrics.jsonl.** UTF-8, one JSON object per line, in the order things happened.
Two kinds of records, both with an integer ``step`` and a ``split``:

* metric records, ``split`` = ``"train"`` or ``"eval"``, with the scalars known at
  that step (names as in TensorBoard/W&B; losses in nats per target token)::

      {"step": 120, "split": "train", "train/loss": 2.31, "train/loss_smoothed": 2.35,
       "train/ppl": 10.07, "train/tokens": 4096, "train/tokens_seen": 495616,
       "train/accuracy": 0.52, "throughput/tokens_per_s": 18211.4,
       "train/grad_norm": 0.91, "train/lr": 0.0003, "train/term/ce": 2.30, "train/term/z": 0.01}
      {"step": 200, "split": "eval", "eval/loss": 2.41, "eval/ppl": 11.13, "eval/tokens": 8192,
       "eval/accuracy": 0.5, "eval/train_loss": 2.25, "eval/term/ce": 2.40}

* event records, with an ``event`` key (a kind of ``lmloss.monitor.Event``)::

      {"step": 57, "split": "train", "event": "spike", "metric": "train/loss", "value": 9.1,
       "threshold": 4.3, "message": "step 57: train/loss spiked to 9.1, above 4.3 = ..."}

Keys that are absent were not given. Non-finite numbers are written as ``NaN`` /
``Infinity`` (what Python's ``json`` writes and reads; so do pandas and jq). A
resumed run appends to the same file and may repeat steps it had logged before the
crash: readers keep the *last* record of each (split, step).

**Crash safety.** Each record is one ``os.write`` of a whole line on a file opened
with ``O_APPEND`` (no Python-side buffer to lose), optionally followed by
``fsync``. A crash can at worst cut the last line; ``read_jsonl`` keeps every full
record and reports what it skipped, and a new ``JsonlSink`` on that file first ends
the cut line so the next record starts on a line of its own.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lmloss._files import atomic_write
from lmloss.jsonl import NestingError, loads_bounded
from lmloss.monitor.events import Event

__all__ = [
    "CsvSink",
    "JsonlSink",
    "RunLog",
    "Sink",
    "SkippedLine",
    "TensorBoardSink",
    "read_jsonl",
    "run_dir_sinks",
]

METRICS_FILE = "metrics.jsonl"


@runtime_checkable
class Sink(Protocol):
    """Anything that takes the monitor's records (metric and event records, as above)."""

    def write(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


# --- JSONL ---------------------------------------------------------------------------


class JsonlSink:
    """Appends one JSON line per record to ``path`` (see the module docstring).

    Args:
        path: the file; its folder is created. Opened on the first record, so a
            sink that never writes (e.g. on rank 1) never touches the disk.
        fsync: ``os.fsync`` after every record: survives a power loss, not only a
            crash of the process, at the price of a disk round trip per record.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        if not isinstance(fsync, bool):
            raise TypeError(f"fsync must be a bool, got {fsync!r}")
        self.path = Path(path)
        self.fsync = fsync
        self._fd: int | None = None

    def write(self, record: Mapping[str, Any]) -> None:
        if not isinstance(record, Mapping):
            raise TypeError(f"a record must be a mapping, got {type(record).__name__}")
        line = (json.dumps(dict(record), ensure_ascii=False) + "\n").encode("utf-8")
        if self._fd is None:
            self._fd = self._open()
        _write_all(self._fd, line)
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # A previous writer died mid-line: end that line, so it stays one bad line
        # instead of swallowing our first record.
        size = os.fstat(fd).st_size
        if size:
            with open(self.path, "rb") as existing:
                existing.seek(size - 1)
                if existing.read(1) != b"\n":
                    _write_all(fd, b"\n")
        return fd


def _write_all(fd: int, data: bytes) -> None:
    # One write(2) for a line in practice; the loop only covers a short write.
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


@dataclass(frozen=True)
class SkippedLine:
    """A line of a JSONL file that ``read_jsonl`` could not use.

    Attributes:
        line: 1-based line number.
        reason: why, in words.
        text: the start of the line (up to 80 characters).
    """

    line: int
    reason: str
    text: str

    def describe(self, path: str | os.PathLike[str] = "") -> str:
        where = f"{path}:{self.line}" if path else f"line {self.line}"
        return f"skipped {where}: {self.reason}: {self.text!r}"


@dataclass(frozen=True)
class RunLog:
    """The content of a ``metrics.jsonl`` file.

    Attributes:
        records: metric records (``"split"`` = ``"train"`` or ``"eval"``) in file order.
        events: event records as ``Event`` objects, in file order.
        skipped: lines that were cut, not JSON, or not records.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    skipped: list[SkippedLine] = field(default_factory=list)


def read_jsonl(path: str | os.PathLike[str]) -> RunLog:
    """Read a ``metrics.jsonl`` file, keeping every full record and reporting the rest.

    A last line without its newline is what a crash mid-write leaves; it is skipped
    (and reported) unless it happens to be a complete record. Broken lines in the
    middle (an earlier crash, then a resumed run) are skipped the same way.
    """
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    complete_last = data.endswith(b"\n")
    if complete_last:
        lines.pop()  # the empty string after the final newline
    log = RunLog()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        cut = number == len(lines) and not complete_last
        _parse_line(number, raw, cut, log)
    return log


def _parse_line(number: int, raw: bytes, cut: bool, log: RunLog) -> None:
    text = raw.decode("utf-8", errors="replace")
    preview = text[:80]
    try:
        record = loads_bounded(text)
    except NestingError as error:
        log.skipped.append(SkippedLine(number, str(error), preview))
        return
    except json.JSONDecodeError as error:
        reason = (
            f"truncated last line ({len(raw)} bytes, no newline: the writer stopped mid-record)"
            if cut
            else f"not valid JSON ({error.msg} at column {error.colno})"
        )
        log.skipped.append(SkippedLine(number, reason, preview))
        return
    if not isinstance(record, dict) or isinstance(record.get("step"), bool) or not isinstance(record.get("step"), int):
        log.skipped.append(SkippedLine(number, "not a record (a JSON object with an integer 'step')", preview))
        return
    if "event" in record:
        try:
            log.events.append(Event.from_record(record))
        except (TypeError, ValueError) as error:
            log.skipped.append(SkippedLine(number, f"bad event record ({error})", preview))
        return
    if record.get("split") not in ("train", "eval"):
        log.skipped.append(SkippedLine(number, f"unknown split {record.get('split')!r}", preview))
        return
    log.records.append(record)


# --- CSV -----------------------------------------------------------------------------


class CsvSink:
    """Metric records as CSV rows (events are not written: they live in the JSONL file).

    The header is the union of the keys seen, ``step`` and ``split`` first. When a
    record brings a new key (a loss term appears, the first evaluation), the file is
    rewritten once with the wider header (atomically: temporary file + ``os.replace``).
    Resuming on an existing file keeps its header.

    Args:
        path: the file; its folder is created.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._columns: list[str] = []
        self._file: io.TextIOWrapper | None = None

    def write(self, record: Mapping[str, Any]) -> None:
        if not isinstance(record, Mapping):
            raise TypeError(f"a record must be a mapping, got {type(record).__name__}")
        if "event" in record:
            return
        file = self._file if self._file is not None else self._open()
        new = [key for key in record if key not in self._columns]
        if new:
            file = self._widen(file, self._columns + new)
        buffer = io.StringIO()
        csv.DictWriter(buffer, self._columns, lineterminator="\n").writerow(dict(record))
        file.write(buffer.getvalue())  # one write of the whole row
        file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> io.TextIOWrapper:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header: list[str] = []
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, newline="", encoding="utf-8") as existing:
                header = next(csv.reader(existing), [])
        self._columns = header or ["step", "split"]
        self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 (kept open)
        if not header:
            self._file.write(",".join(self._columns) + "\n")
            self._file.flush()
        return self._file

    def _widen(self, file: io.TextIOWrapper, columns: list[str]) -> io.TextIOWrapper:
        file.close()
        with open(self.path, newline="", encoding="utf-8") as existing:
            rows = list(csv.DictReader(existing))

        def write(out: Any) -> None:
            writer = csv.DictWriter(out, columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

        atomic_write(self.path, write, binary=False)
        self._columns = columns
        self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 (kept open)
        return self._file


# --- TensorBoard ---------------------------------------------------------------------


class TensorBoardSink:
    """Scalars to TensorBoard (``add_scalar(name, value, step)``), events as text.

    Needs the ``tensorboard`` package (``pip install tensorboard``); checked here,
    so a missing package fails when the sink is built, not mid-run.

    Args:
        log_dir: the TensorBoard log directory (e.g. ``RUN_DIR/tensorboard``).
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch raises this when tensorboard is missing
            raise ImportError(
                "TensorBoardSink needs the tensorboard package: pip install tensorboard (or pip install 'lmloss[test]')"
            ) from error
        self.log_dir = Path(log_dir)
        self._writer_type = SummaryWriter
        self._writer: Any = None

    def write(self, record: Mapping[str, Any]) -> None:
        if self._writer is None:
            self._writer = self._writer_type(log_dir=str(self.log_dir))
        step = int(record["step"])
        if "event" in record:
            self._writer.add_text(f"events/{record['event']}", str(record["message"]), step)
            return
        for name, value in record.items():
            if name not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def run_dir_sinks(
    run_dir: str | os.PathLike[str], *, csv: bool = False, tensorboard: bool = False, fsync: bool = False
) -> list[Sink]:
    """The sinks of the run-directory convention: ``metrics.jsonl``, and on request
    ``metrics.csv`` and ``tensorboard/``."""
    root = Path(run_dir)
    sinks: list[Sink] = [JsonlSink(root / METRICS_FILE, fsync=fsync)]
    if csv:
        sinks.append(CsvSink(root / "metrics.csv"))
    if tensorboard:
        sinks.append(TensorBoardSink(root / "tensorboard"))
    return sinks
