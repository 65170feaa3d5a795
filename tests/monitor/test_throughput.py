"""Throughput records: tokens/s, achieved TFLOP/s and MFU over each read window, worked out by hand."""

from __future__ import annotations

import pytest
from test_monitor import FakeClock, ListSink

from lmloss.monitor import LossMonitor


def _run(monitor: LossMonitor, clock: FakeClock, times: list[float], **values: float) -> None:
    for step, t in enumerate(times):
        clock.now = t
        monitor.update(step, loss=1.0, **values)


def test_tflops_and_mfu_follow_torchtitans_formula():
    clock, sink = FakeClock(tick=0.0), ListSink()
    # H100 bf16 peak 989e12 FLOP/s; 6e9 FLOPs per token (a 1B model, 6 * N).
    monitor = LossMonitor(clock=clock, sinks=[sink], sync_every=4, flops_per_token=6e9, peak_flops=989e12)
    _run(monitor, clock, [0.0, 1.0, 2.0, 3.0], tokens=1000, input_tokens=50_000)
    last = sink.metrics()[-1]
    # Steps 1-3 in 3 s: 1,000 target tokens/s; 50,000 processed tokens/s * 6e9 = 300 TFLOP/s.
    assert last["throughput/tokens_per_s"] == pytest.approx(1000.0)
    assert last["throughput/tflops"] == pytest.approx(300.0)
    assert last["throughput/mfu"] == pytest.approx(100 * 300e12 / 989e12)
    assert monitor.stats.tokens_per_s == pytest.approx(1000.0)


def test_flops_count_the_target_tokens_without_input_tokens():
    clock, sink = FakeClock(tick=0.0), ListSink()
    monitor = LossMonitor(clock=clock, sinks=[sink], sync_every=2, flops_per_token=1e9)
    _run(monitor, clock, [0.0, 2.0], tokens=4000)
    # One window (steps 0-1): step 0 starts the clock, step 1's 4,000 tokens took 2 s.
    assert [r["throughput/tflops"] for r in sink.metrics()] == pytest.approx([4000 / 2 * 1e9 / 1e12] * 2)
    assert all("throughput/mfu" not in r for r in sink.metrics())  # no peak given


def test_no_flops_records_without_flops_per_token():
    clock, sink = FakeClock(tick=0.0), ListSink()
    _run(LossMonitor(clock=clock, sinks=[sink]), clock, [0.0, 1.0, 2.0], tokens=10)
    assert all(not {"throughput/tflops", "throughput/mfu"} & set(r) for r in sink.metrics())


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(peak_flops=989e12), ValueError, "needs flops_per_token"),
        (dict(flops_per_token=-1.0), ValueError, "flops_per_token"),
        (dict(flops_per_token=float("inf")), ValueError, "flops_per_token"),
        (dict(flops_per_token=6e9, peak_flops="989e12"), TypeError, "peak_flops"),
    ],
)
def test_bad_flops_options_raise(options, error, match):
    with pytest.raises(error, match=match):
        LossMonitor(**options)
