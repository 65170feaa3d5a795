"""Plots and ``lmloss plot``: PNG files written, sized, readable; cut JSONL files tolerated."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_monitor import FakeClock, debiased_ema, eventful_calls, feed

from lmloss.cli import main
from lmloss.monitor import LossMonitor, read_jsonl, run_dir_sinks
from lmloss.monitor.plot import ema, plot_run, run_data

PANELS = ["loss", "perplexity", "lr", "terms", "grad_norm", "throughput", "accuracy"]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (signature, then the IHDR chunk)."""
    data = path.read_bytes()[:24]
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise AssertionError(f"{path} is not a PNG file")
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run with spikes, a NaN, evaluations, a plateau, overfitting and divergence."""
    root = tmp_path_factory.mktemp("run")
    monitor = LossMonitor(sinks=run_dir_sinks(root), clock=FakeClock())
    feed(monitor, eventful_calls())
    monitor.close()
    return root


def test_plot_run_writes_every_panel(run_dir):
    result = plot_run(run_dir)
    names = [p.name for p in result.paths]
    assert names == [f"{panel}.png" for panel in PANELS] + ["overview.png"]
    for path in result.paths:
        assert path.parent == run_dir / "plots" and path.stat().st_size > 20_000
        expected = (1920, 2160) if path.name == "overview.png" else (1200, 675)  # 150 dpi
        assert png_size(path) == expected, path.name
    # Atomic writes: no temporary file is left next to the PNGs.
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == sorted(names)


def test_panels_without_data_are_left_out(tmp_path):
    monitor = LossMonitor(sinks=run_dir_sinks(tmp_path))
    for step in range(20):
        monitor.update(step, loss=3.0 - 0.1 * step)
    monitor.close()
    names = [p.name for p in plot_run(tmp_path, out_dir=tmp_path / "pngs").paths]
    assert names == ["loss.png", "perplexity.png", "overview.png"]
    assert png_size(tmp_path / "pngs" / "overview.png") == (1920, 540)  # two panels side by side


def test_run_data_keeps_the_last_record_of_a_step_and_smooths(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "split": "train", "train/loss": float(s)} for s in range(5)]
    records += [{"step": 3, "split": "train", "train/loss": 30.0}]  # a resumed run re-logs step 3
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = run_data(read_jsonl(path), smoothing=0.5)
    assert data.get("train/loss") == ([0, 1, 2, 3, 4], [0.0, 1.0, 2.0, 30.0, 4.0])
    assert data.get("train/loss_smoothed")[1] == pytest.approx(debiased_ema([0.0, 1.0, 2.0, 30.0, 4.0], 0.5))


def test_ema_by_hand():
    # w = 0.5: 2/1, (1 + 1)/1.5, (1 + 4)/1.75; a NaN repeats the previous value.
    assert ema([2.0, 1.0, float("nan"), 4.0], 0.5) == pytest.approx([2.0, 4 / 3, 4 / 3, 5 / 1.75])
    with pytest.raises(ValueError, match="smoothing must be in"):
        ema([1.0], 1.0)


def test_cli_plots_a_cut_file_up_to_its_last_full_record(run_dir, tmp_path, capsys):
    cut_dir = tmp_path / "crashed"
    cut_dir.mkdir()
    data = (run_dir / "metrics.jsonl").read_bytes()
    full_lines = data.count(b"\n")
    (cut_dir / "metrics.jsonl").write_bytes(data[: len(data) - 40])  # the crash cuts the last line
    assert main(["plot", str(cut_dir)]) == 0
    out, err = capsys.readouterr()
    assert f"metrics.jsonl:{full_lines}: truncated last line" in err
    log = read_jsonl(cut_dir / "metrics.jsonl")
    assert len(log.records) + len(log.events) == full_lines - 1
    assert f"read {len(log.records)} records and {len(log.events)} events" in out and "1 line(s) skipped" in out
    assert (cut_dir / "plots" / "loss.png").stat().st_size > 20_000


def test_cli_reports_a_missing_run_and_bad_options(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nowhere")]) == 1
    assert "no metrics file at" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 1
    assert "nothing to plot" in capsys.readouterr().err
    assert main(["plot", str(tmp_path), "--smoothing", "1.5"]) == 2


def test_console_script(run_dir, tmp_path):
    script = Path(sys.executable).with_name("lmloss")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lmloss.cli"]
    done = subprocess.run(
        [*command, "plot", str(run_dir), "--out", str(tmp_path), "--smoothing", "0.6"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'loss.png'}" in done.stdout
    assert png_size(tmp_path / "loss.png") == (1200, 675)


def test_atomic_write_gives_usual_permissions_and_leaves_nothing_on_error(tmp_path):
    import os
    import stat

    from lmloss._files import atomic_write

    target = tmp_path / "a.png"
    atomic_write(target, lambda handle: handle.write(b"png"))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0o600

    def fail(handle):
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"png" and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_a_panel_draws_and_finishes_only_with_data():
    from matplotlib.figure import Figure

    from lmloss.monitor.plot import PANELS, RunData

    empty = Figure().add_subplot()
    assert PANELS["accuracy"](empty, RunData()) is False
    assert empty.get_title(loc="left") == "" and not empty.get_lines()
    ax = Figure().add_subplot()
    data = RunData(series={"eval/accuracy": ([10, 20], [0.25, 0.5])}, name="run")
    assert PANELS["accuracy"](ax, data) is True
    assert ax.get_title(loc="left") == "Token accuracy" and ax.get_title(loc="right") == "run"
    assert ax.get_ylabel() == "next-token accuracy (%)"
    (line,) = ax.get_lines()  # eval only: no train curve
    assert list(line.get_ydata()) == [25.0, 50.0] and line.get_label() == "eval"
