"""LossMonitor: detectors on series with known answers, statistics, batching, state, ranks."""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from collections.abc import Mapping
from typing import Any

import pytest
import torch
import torch.distributed as dist

from _dist import run_gloo
from lmloss.monitor import (
    AUTO_TRAIN_INTERVAL,
    DEVICE_SYNC_EVERY,
    ConvergedRule,
    DivergenceRule,
    Event,
    LossMonitor,
    MaxRatioRule,
    OverfittingRule,
    PlateauRule,
    SpikeRule,
)

NAN, INF = float("nan"), float("inf")

# --- helpers (shared with the other tests/monitor/test_*.py files) ---------------------------------


def clean_curve(n: int, *, seed: int = 0, noise: float = 0.03) -> list[float]:
    """A decreasing loss with Gaussian noise: 2 + 3·exp(-step/150) + N(0, noise)."""
    rng = random.Random(seed)
    return [2.0 + 3.0 * math.exp(-step / 150) + rng.gauss(0.0, noise) for step in range(n)]


def grad_norms(n: int, *, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [1.0 + rng.gauss(0.0, 0.05) for _ in range(n)]


def debiased_ema(values: list[float], w: float) -> list[float]:
    """The TensorBoard/W&B formula, written out independently of lmloss."""
    last = n = 0.0
    out = []
    for y in values:
        last, n = last * w + y, n * w + 1
        out.append(last / n)
    return out


class ListSink:
    """Keeps every record it is given."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.closed = False

    def write(self, record: Mapping[str, Any]) -> None:
        self.records.append(dict(record))

    def close(self) -> None:
        self.closed = True

    def metrics(self, split: str = "train") -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("split") == split and "event" not in r]


class FakeClock:
    """Advances by ``tick`` seconds per call (the monitor calls it once per update)."""

    def __init__(self, tick: float = 0.25) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def eventful_calls(n: int = 1000) -> list[tuple[str, int, dict[str, Any]]]:
    """A run with one of (almost) everything: loss spikes at 300 and 700, NaN at 350, grad-norm
    spike at 420, evaluations every 100 steps that stop improving after step 599 while train
    falls (plateau, overfitting at 899), and a loss that climbs from step 800 (divergence)."""
    losses, norms = clean_curve(n, seed=3), grad_norms(n)
    losses[300] += 1.5
    losses[700] += 1.5
    losses[350] = NAN
    norms[420] *= 10
    for s in range(800, n):
        losses[s] += (s - 800) * 0.03
    calls: list[tuple[str, int, dict[str, Any]]] = []
    for s in range(n):
        calls.append(
            (
                "train",
                s,
                {
                    "loss": losses[s],
                    "tokens": 1000,
                    "correct": 300 + s // 5,
                    "grad_norm": norms[s],
                    "lr": 1e-3 * min(1.0, (s + 1) / 100),
                    "terms": {"ce": losses[s] - 0.05, "z": 0.05},
                },
            )
        )
        if s % 100 == 99:
            smooth = 2.0 + 3.0 * math.exp(-s / 150)
            rise = 0.05 * max(0, (s - 499) // 100)
            calls.append(
                ("eval", s, {"loss": smooth + 0.3 + rise, "train_loss": smooth, "tokens": 4000, "correct": 1200})
            )
    return calls


def feed(monitor: LossMonitor, calls: list[tuple[str, int, dict[str, Any]]]) -> list[Event]:
    events: list[Event] = []
    for split, step, kwargs in calls:
        events += monitor.update(step, **kwargs) if split == "train" else monitor.update_eval(step, **kwargs)
    return events


def kinds(events: list[Event]) -> list[tuple[int, str, str]]:
    return [(e.step, e.kind, e.metric) for e in events]


# --- detectors on series with known answers --------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_clean_noisy_decreasing_curve_has_no_event(seed):
    monitor = LossMonitor()
    losses, norms = clean_curve(1000, seed=seed), grad_norms(1000, seed=seed + 10)
    events = []
    for step, (loss, norm) in enumerate(zip(losses, norms)):
        events += monitor.update(step, loss=loss, grad_norm=norm)
        if step % 100 == 99:  # the noise-free eval curve keeps falling
            events += monitor.update_eval(step, loss=2.3 + 3.0 * math.exp(-step / 150))
    assert events == [] and monitor.events == []


def test_spike_is_found_at_its_step_and_only_there():
    losses, norms = clean_curve(1000), grad_norms(1000)
    losses[500] += 1.0
    norms[700] += 2.0
    monitor = LossMonitor()
    found = {}
    for step, (loss, norm) in enumerate(zip(losses, norms)):
        for event in monitor.update(step, loss=loss, grad_norm=norm):
            found[(event.step, event.metric)] = event
            assert event.step == step  # sync_every=1 on CPU: reported at the step itself
    assert sorted(found) == [(500, "train/loss"), (700, "train/grad_norm")]
    assert {e.kind for e in found.values()} == {"spike"}
    # The threshold is OLMo-core's: mean + 6 * population std of the previous 128 values.
    previous = losses[500 - 128 : 500]
    expected = statistics.fmean(previous) + 6 * statistics.pstdev(previous)
    assert found[(500, "train/loss")].threshold == pytest.approx(expected, rel=1e-12)
    assert found[(500, "train/loss")].value == losses[500]
    assert "spiked" in found[(500, "train/loss")].message and "128" in found[(500, "train/loss")].message


def test_window_spike_rule_by_hand():
    # Window [1, 2, 3, 4]: mean 2.5, population std sqrt(1.25) = 1.1180; limit with 2 std = 4.7361.
    rule = SpikeRule(window=4, num_std=2.0, metrics=("loss",))
    for value, spike in ((4.73, False), (4.74, True)):
        monitor = LossMonitor(spike=rule, max_ratio=None, divergence=None)
        events = [e for s, x in enumerate([1.0, 2.0, 3.0, 4.0, value]) for e in monitor.update(s, loss=x)]
        assert [e.step for e in events] == ([4] if spike else [])
    # Not before the window is full; not when the window is constant (std < min_std).
    monitor = LossMonitor(spike=rule, max_ratio=None, divergence=None)
    assert [e for s, x in enumerate([1.0, 2.0, 3.0, 100.0]) for e in monitor.update(s, loss=x)] == []
    monitor = LossMonitor(spike=rule, max_ratio=None, divergence=None)
    assert [e for s, x in enumerate([1.0] * 4 + [100.0]) for e in monitor.update(s, loss=x)] == []


def test_megatron_max_ratio_rule_by_hand():
    # Too early at step 50 (50 < 100 values seen), yet 10.0 becomes the running max: the limit is 100.
    for last, expected in ((99.0, []), (100.0, [(111, "spike", "train/loss")])):
        monitor = LossMonitor(spike=None, divergence=None)
        series = [1.0] * 50 + [10.0] + [1.0] * 60 + [last]
        events = [e for s, x in enumerate(series) for e in monitor.update(s, loss=x)]
        assert kinds(events) == expected and all(e.threshold == 100.0 for e in events)
    # A constant series: the window rule has no std to measure against; the 10x rule fires, once.
    monitor = LossMonitor(divergence=None)
    events = [e for s, x in enumerate([1.0] * 150 + [10.0]) for e in monitor.update(s, loss=x)]
    assert kinds(events) == [(150, "spike", "train/loss")] and "10 x its running maximum 1" in events[0].message
    # Both thresholds are configurable.
    monitor = LossMonitor(spike=None, divergence=None, max_ratio=MaxRatioRule(factor=3.0, min_samples=3))
    events = [e for s, x in enumerate([1.0, 1.0, 1.0, 3.0]) for e in monitor.update(s, loss=x)]
    assert kinds(events) == [(3, "spike", "train/loss")] and events[0].threshold == 3.0


def test_nan_and_inf_are_reported_at_once():
    monitor = LossMonitor()
    losses = clean_curve(300)
    for step, loss in enumerate(losses):
        grad_norm = INF if step == 40 else 1.0 + 0.01 * (step % 7)
        loss_value = torch.tensor(NAN) if step == 37 else torch.tensor(loss)
        events = monitor.update(step, loss=loss_value, grad_norm=grad_norm)
        if step == 37:
            assert kinds(events) == [(37, "nan", "train/loss")] and "train/loss=nan" in events[0].message
        elif step == 40:
            assert kinds(events) == [(40, "nan", "train/grad_norm")] and "inf" in events[0].message
        else:
            assert events == []
    # The NaN never entered the EMA or the windows.
    assert math.isfinite(monitor.stats.smoothed_loss)
    nan_eval = monitor.update_eval(299, loss=INF)
    assert kinds(nan_eval) == [(299, "nan", "eval/loss")]


def test_plateau_after_a_known_evaluation():
    evals = [3.0, 2.5, 2.2, 2.0, 1.92, 1.85, 1.85, 1.86, 1.85, 1.9, 1.7, 1.7, 1.7, 1.7]
    #          0    10   20   30   40   50 (best)  60 / 70 / 80: 3 without improvement -> plateau at 80
    #          then 1.7 at 100 improves (re-arms); 110, 120, 130 do not -> plateau again at 130
    monitor = LossMonitor()
    events = [e for i, x in enumerate(evals) for e in monitor.update_eval(10 * i, loss=x)]
    assert kinds(events) == [(80, "plateau", "eval/loss"), (130, "plateau", "eval/loss")]
    assert events[0].threshold == 1.85 and "best 1.85 at step 50" in events[0].message
    # min_delta=0.1, patience 2: 1.92 (step 40) is no improvement over 2.0, 1.85 is; then
    # 1.85 and 1.86 are not below 1.75: plateau at step 70.
    monitor = LossMonitor(plateau=PlateauRule(patience=2, min_delta=0.1))
    events = [e for i, x in enumerate(evals) for e in monitor.update_eval(10 * i, loss=x)]
    assert kinds(events)[0] == (70, "plateau", "eval/loss")


def test_plateau_relative_threshold_as_reduce_lr_on_plateau():
    rule = PlateauRule(patience=1, min_delta=1e-4, relative=True)
    monitor = LossMonitor(plateau=rule, overfitting=None)
    assert monitor.update_eval(0, loss=1.0) == []
    assert monitor.update_eval(1, loss=0.9998) == []  # 0.9998 < 1.0 * (1 - 1e-4): an improvement
    assert kinds(monitor.update_eval(2, loss=0.99975)) == [(2, "plateau", "eval/loss")]  # > 0.9998 * 0.9999


def test_a_flat_training_loss_is_a_plateau_by_default_without_evaluations():
    # Reproduction: LossMonitor() with only update() calls on a loss flat for 4,000 steps.
    monitor = LossMonitor()
    events = [e for step in range(4000) for e in monitor.update(step, loss=2.0)]
    # Checked every AUTO_TRAIN_INTERVAL steps: best at 0, no improvement at 500, 1000, 1500.
    assert AUTO_TRAIN_INTERVAL == 500
    assert kinds(events) == [(1500, "plateau", "train/loss_smoothed")]


def test_the_default_train_plateau_stops_once_evaluations_arrive():
    monitor = LossMonitor()
    events = monitor.update(0, loss=2.0) + monitor.update_eval(0, loss=2.5)
    events += [e for step in range(1, 4000) for e in monitor.update(step, loss=2.0)]
    assert events == []  # evaluations decide plateaus from here on


def test_a_falling_training_loss_is_no_plateau_and_none_turns_the_default_off():
    falling = LossMonitor()
    assert [e for step in range(4000) for e in falling.update(step, loss=5.0 - step / 1000)] == []
    off = LossMonitor(plateau=PlateauRule(train_interval=None))
    assert [e for step in range(4000) for e in off.update(step, loss=2.0)] == []
    with pytest.raises(TypeError, match="train_interval"):
        PlateauRule(train_interval="sometimes")


def test_the_default_train_plateau_resumes_from_a_checkpoint():
    whole, first = LossMonitor(), LossMonitor()
    events = [e for step in range(2000) for e in whole.update(step, loss=2.0)]
    for step in range(800):
        first.update(step, loss=2.0)
    resumed = LossMonitor()
    resumed.load_state_dict(first.state_dict())
    assert kinds([e for step in range(800, 2000) for e in resumed.update(step, loss=2.0)]) == kinds(events)


def test_z_loss_is_logged_as_its_own_scalar():
    sink = ListSink()
    monitor = LossMonitor(sinks=[sink])
    monitor.update(0, loss=torch.tensor(2.5), z_loss=torch.tensor(0.04), tokens=10)
    monitor.update(1, loss=2.4)
    records = sink.metrics()
    assert records[0]["train/z_loss"] == pytest.approx(0.04) and "train/z_loss" not in records[1]


def test_plateau_of_the_training_loss():
    # 1 + 0.01 * (300 - step) until step 300, then flat at 1.0. Checks at 0, 100, ...: the smoothed
    # loss still falls by 0.09 from step 300 to 400 (EMA lag: 9 steps x 0.01), then by < 1e-3.
    monitor = LossMonitor(plateau=PlateauRule(min_delta=1e-3, train_interval=100), spike=None)
    events = []
    for step in range(1000):
        events += monitor.update(step, loss=1.0 + 0.01 * max(0, 300 - step))
    assert kinds(events) == [(700, "plateau", "train/loss_smoothed")]
    assert "best 1 at step 400" in events[0].message


def test_overfitting_when_eval_rises_while_train_falls():
    monitor = LossMonitor(plateau=None)
    train = [3.0 - 0.1 * i for i in range(10)]  # matched train estimates, always falling
    evals = [3.2, 3.0, 2.9, 2.85, 2.9, 2.95, 3.0, 3.1, 3.2, 3.3]  # best at eval 3, then rising
    events = [e for i in range(10) for e in monitor.update_eval(100 * i, loss=evals[i], train_loss=train[i])]
    # Evals 4, 5, 6 widen the gap while train falls: fires at the third, once.
    assert kinds(events) == [(600, "overfitting", "eval/loss")]
    assert "2.85" in events[0].message and "gap widened" in events[0].message
    # Eval rising *with* train rising is not overfitting.
    monitor = LossMonitor(plateau=None)
    rising = [e for i in range(10) for e in monitor.update_eval(100 * i, loss=evals[i], train_loss=2.0 + 0.2 * i)]
    assert rising == []


def test_overfitting_uses_the_smoothed_train_loss_without_a_matched_estimate():
    monitor = LossMonitor(plateau=None, overfitting=OverfittingRule(patience=2))
    events = []
    for step in range(600):
        events += monitor.update(step, loss=3.0 - step / 300)
        if step % 100 == 99:
            events += monitor.update_eval(step, loss=[2.9, 2.6, 2.5, 2.6, 2.7, 2.8][step // 100])
    assert kinds(events) == [(499, "overfitting", "eval/loss")]


def test_divergence_on_the_smoothed_loss():
    losses = [3.0 - 0.01 * s for s in range(100)] + [2.0 + 0.05 * s for s in range(100)]
    smoothed = debiased_ema(losses, 0.9)
    lowest = min(smoothed)
    expected = next(s for s, x in enumerate(smoothed) if x > 2 * lowest and x > lowest + 0.1)
    monitor = LossMonitor(spike=None, max_ratio=None)
    events = [e for s, x in enumerate(losses) for e in monitor.update(s, loss=x)]
    assert kinds(events) == [(expected, "divergence", "train/loss_smoothed")]
    assert events[0].threshold == pytest.approx(2 * lowest, rel=1e-12)
    # Raw (OLMo) mode with a warm-up: nothing at or before step 150.
    rule = DivergenceRule(factor=2.0, smoothed=False, warmup_steps=150)
    monitor = LossMonitor(spike=None, max_ratio=None, divergence=rule)
    events = [e for s, x in enumerate(losses) for e in monitor.update(s, loss=x)]
    assert kinds(events) == [(151, "divergence", "train/loss")]  # 2.0 + 0.05*51 = 4.55 > 2 * 2.01 after warm-up


def test_converged_when_the_target_is_reached():
    losses = [2.0 * 0.97**s for s in range(200)]
    smoothed = debiased_ema(losses, 0.9)
    expected = next(s for s, x in enumerate(smoothed) if x <= 0.5)
    monitor = LossMonitor(converged=ConvergedRule(target_loss=0.5), divergence=None)
    events = [e for s, x in enumerate(losses) for e in monitor.update(s, loss=x)]
    events += monitor.update_eval(199, loss=0.4)
    assert kinds(events) == [(expected, "converged", "train/loss_smoothed"), (199, "converged", "eval/loss")]


# --- statistics ------------------------------------------------------------------------------


def test_statistics_by_hand():
    clock = FakeClock(tick=0.0)
    sink = ListSink()
    monitor = LossMonitor(ema_weight=0.5, clock=clock, sinks=[sink])
    steps = [(2.0, 100, 10, 10.0), (1.0, 100, 50, 12.0), (4.0, 300, 60, 13.0)]  # loss, tokens, correct, time
    for step, (loss, tokens, correct, t) in enumerate(steps):
        clock.now = t
        monitor.update(
            step, loss=torch.tensor(loss), tokens=torch.tensor(tokens), correct=correct, lr=0.1, grad_norm=1.5
        )
    stats = monitor.stats
    # EMA, w = 0.5: 2/1 = 2; (1 + 1)/1.5 = 1.3333; (1 + 4)/1.75 = 2.857142...
    assert [r["train/loss_smoothed"] for r in sink.metrics()] == pytest.approx([2.0, 4 / 3, 5 / 1.75], rel=1e-12)
    assert stats.smoothed_loss == pytest.approx(5 / 1.75) and stats.loss == 4.0
    assert stats.ppl == pytest.approx(math.exp(4.0)) and stats.smoothed_ppl == pytest.approx(math.exp(5 / 1.75))
    assert stats.accuracy == pytest.approx(0.2) and stats.tokens_seen == 500
    assert [r.get("throughput/tokens_per_s") for r in sink.metrics()] == [None, 50.0, 300.0]  # 100/2 s, 300/1 s
    assert (stats.best_loss, stats.best_step) == (pytest.approx(4 / 3), 1)
    assert (stats.lr, stats.grad_norm, stats.step) == (0.1, 1.5, 2)
    monitor.update_eval(2, loss=3.0, tokens=10, correct=4)
    monitor.update_eval(3, loss=3.5)
    assert (monitor.stats.best_eval_loss, monitor.stats.best_eval_step, monitor.stats.eval_loss) == (3.0, 2, 3.5)
    assert sink.metrics("eval")[0] == {
        "step": 2,
        "split": "eval",
        "eval/loss": 3.0,
        "eval/ppl": math.exp(3.0),
        "eval/tokens": 10,
        "eval/accuracy": 0.4,
    }


def test_throughput_is_the_rate_over_each_read_window_and_skips_evaluation_time():
    clock = FakeClock(tick=0.0)
    sink = ListSink()
    monitor = LossMonitor(sync_every=4, clock=clock, sinks=[sink])
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0]
    for step, t in enumerate(times):
        clock.now = t
        monitor.update(step, loss=1.0, tokens=100)
    # Window 1: steps 1-3 (step 0 only starts the clock): 300 tokens / 3 s. Window 2: 400 / 7 s.
    assert [r["throughput/tokens_per_s"] for r in sink.metrics()] == [100.0] * 4 + [400 / 7] * 4
    clock.now = 100.0  # a long evaluation
    monitor.update_eval(7, loss=1.0)
    for step, t in enumerate([101.0, 102.0, 103.0, 104.0], start=8):
        clock.now = t
        monitor.update(step, loss=1.0, tokens=100)
    assert [r["throughput/tokens_per_s"] for r in sink.metrics()][-4:] == [100.0] * 4


def test_per_term_losses_and_records():
    sink = ListSink()
    monitor = LossMonitor(sinks=[sink])
    monitor.update(0, loss=2.5, terms={"ce": torch.tensor(2.0), "z": 0.5})
    monitor.update_eval(0, loss=2.6, terms={"ce": 2.1})
    assert sink.records[0]["train/term/ce"] == 2.0 and sink.records[0]["train/term/z"] == 0.5
    assert sink.records[1]["eval/term/ce"] == 2.1


# --- reading values in batches ---------------------------------------------------------------


def test_sync_every_reports_events_of_earlier_steps_with_their_step():
    monitor = LossMonitor(sync_every=4)
    assert monitor.update(0, loss=1.0) == []
    assert monitor.update(1, loss=NAN) == []
    assert monitor.update(2, loss=1.0) == []
    assert kinds(monitor.update(3, loss=1.0)) == [(1, "nan", "train/loss")]
    assert monitor.stats.step == 3
    monitor.update(4, loss=INF)
    assert monitor.stats.step == 3  # not read yet
    assert kinds(monitor.flush()) == [(4, "nan", "train/loss")] and monitor.flush() == []


def test_update_never_reads_a_device_tensor():
    # Meta tensors have no data: any read fails. update() must not read them before a flush.
    monitor = LossMonitor()
    device = torch.tensor(1.0, device="meta")
    for step in range(15):
        assert monitor.update(step, loss=device, tokens=device, grad_norm=device) == []
    assert monitor.sync_every == 16  # the default for values not on the CPU
    with pytest.raises((NotImplementedError, RuntimeError)):
        monitor.update(15, loss=device)  # the 16th step flushes, and reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_update_does_not_synchronise_a_cuda_device():
    monitor = LossMonitor()
    loss, tokens = torch.tensor(2.0, device="cuda"), torch.tensor(100, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        for step in range(DEVICE_SYNC_EVERY - 1):
            assert monitor.update(step, loss=loss * 1.0, tokens=tokens, grad_norm=loss, lr=1e-3) == []
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert monitor.stats.step is None  # nothing read yet
    monitor.update(DEVICE_SYNC_EVERY - 1, loss=loss, tokens=tokens)  # the one read
    assert (monitor.stats.step, monitor.stats.loss, monitor.stats.tokens_seen) == (15, 2.0, 1600)


def test_pending_tensors_are_detached():
    weight = torch.tensor(2.0, requires_grad=True)
    monitor = LossMonitor(sync_every=3)
    monitor.update(0, loss=weight * 3)
    assert not monitor._pending[0].values["loss"].requires_grad  # no graph kept alive
    monitor.flush()
    assert monitor.stats.loss == 6.0


# --- state round trip ------------------------------------------------------------------------


@pytest.mark.parametrize("sync_every", [1, 7])
def test_state_round_trip_mid_run_gives_the_same_events(sync_every):
    calls = eventful_calls()
    whole_sink = ListSink()
    whole = LossMonitor(sinks=[whole_sink], clock=FakeClock(), sync_every=sync_every)
    feed(whole, calls)
    whole.close()
    diverged = next(e.step for e in whole.events if e.kind == "divergence")
    assert 850 < diverged < 899  # the smoothed loss doubles its minimum (~2.1) after ~70 steps of +0.03
    assert kinds(whole.events) == [
        (300, "spike", "train/loss"),
        (350, "nan", "train/loss"),
        (420, "spike", "train/grad_norm"),
        (700, "spike", "train/loss"),
        (diverged, "divergence", "train/loss_smoothed"),
        (899, "plateau", "eval/loss"),
        (899, "overfitting", "eval/loss"),
    ]

    # Mid-run: after the best evaluation (599), before the spike at 700 (the window must survive).
    cut = next(i for i, (split, step, _) in enumerate(calls) if step == 650)
    first_sink, second_sink = ListSink(), ListSink()
    first = LossMonitor(sinks=[first_sink], clock=FakeClock(), sync_every=sync_every)
    feed(first, calls[:cut])
    state = json.loads(json.dumps(first.state_dict()))  # survives JSON (and so torch.save)
    resumed = LossMonitor(sinks=[second_sink], clock=FakeClock(), sync_every=sync_every)
    resumed.load_state_dict(state)
    feed(resumed, calls[cut:])
    resumed.close()

    assert resumed.events == whole.events
    assert resumed.stats.smoothed_loss == whole.stats.smoothed_loss and resumed.stats == whole.stats
    resumed_records = first_sink.records + second_sink.records
    assert len(resumed_records) == len(whole_sink.records)
    for got, expected in zip(resumed_records, whole_sink.records):
        got.pop("throughput/tokens_per_s", None), expected.pop("throughput/tokens_per_s", None)
        assert json.dumps(got) == json.dumps(expected)  # exact, NaN included


def test_load_state_dict_checks_its_input():
    monitor = LossMonitor()
    with pytest.raises(TypeError, match="mapping"):
        monitor.load_state_dict([1, 2])  # type: ignore[arg-type]  # a wrong type on purpose
    with pytest.raises(ValueError, match="version"):
        monitor.load_state_dict({"version": 99})
    monitor.update(0, loss=1.0)
    monitor.update(1, loss=1.0)
    state = monitor.state_dict()
    other = LossMonitor(sync_every=5)
    other.update(0, loss=1.0)
    with pytest.raises(ValueError, match="unread steps"):
        other.load_state_dict(state)
    fresh = LossMonitor()
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="does not come after the last step 1"):
        fresh.update(1, loss=1.0)


# --- bad input -------------------------------------------------------------------------------


def test_bad_arguments_fail_with_a_clear_message():
    monitor = LossMonitor()
    with pytest.raises(TypeError, match=r"step=...\) must be an int"):
        monitor.update(1.0, loss=1.0)  # type: ignore[arg-type]  # a wrong type on purpose
    with pytest.raises(ValueError, match="steps are >= 0"):
        monitor.update(-1, loss=1.0)
    with pytest.raises(ValueError, match="one number"):
        monitor.update(0, loss=torch.ones(2))
    with pytest.raises(TypeError, match="loss must be a number"):
        monitor.update(0, loss="2.0")  # type: ignore[arg-type]  # a wrong type on purpose
    with pytest.raises(ValueError, match="real number"):
        monitor.update(0, loss=torch.tensor(True))
    with pytest.raises(ValueError, match="correct= needs tokens="):
        monitor.update(0, loss=1.0, correct=3)
    with pytest.raises(ValueError, match="terms names"):
        monitor.update(0, loss=1.0, terms={"a/b": 1.0})
    with pytest.raises(TypeError, match="terms must be a mapping"):
        monitor.update(0, loss=1.0, terms=[1.0])  # type: ignore[arg-type]  # a wrong type on purpose
    monitor.update(0, loss=1.0)
    with pytest.raises(ValueError, match="steps must increase"):
        monitor.update(0, loss=1.0)
    with pytest.raises(ValueError, match="train step 1: tokens must be"):
        monitor.update(1, loss=1.0, tokens=torch.tensor(-3))  # read (and so checked) at the flush
    with pytest.raises(ValueError, match=re.escape("correct=7.0 must be between 0 and tokens=5")):
        monitor.update(2, loss=1.0, tokens=5, correct=7)


def test_bad_configuration_fails_with_a_clear_message():
    with pytest.raises(ValueError, match="ema_weight must be in \\[0, 1\\)"):
        LossMonitor(ema_weight=1.0)
    with pytest.raises(ValueError, match="sync_every must be >= 1"):
        LossMonitor(sync_every=0)
    with pytest.raises(TypeError, match="write\\(record\\) and close\\(\\)"):
        LossMonitor(sinks=[object()])  # type: ignore[list-item]  # a wrong type on purpose
    with pytest.raises(TypeError, match="spike must be a SpikeRule"):
        LossMonitor(spike=PlateauRule())  # type: ignore[arg-type]  # a wrong type on purpose
    with pytest.raises(ValueError, match=re.escape("SpikeRule.window must be >= 2")):
        SpikeRule(window=1)
    with pytest.raises(ValueError, match="unknown metric"):
        SpikeRule(metrics=("accuracy",))
    with pytest.raises(TypeError, match="tuple of metric names"):
        SpikeRule(metrics="loss")  # type: ignore[arg-type]  # a wrong type on purpose
    with pytest.raises(ValueError, match="factor must be >= 1"):
        DivergenceRule(factor=0.5)
    with pytest.raises(ValueError, match="patience must be >= 1"):
        PlateauRule(patience=0)
    with pytest.raises(ValueError, match="must be finite"):
        ConvergedRule(target_loss=NAN)


def test_sinks_receive_records_then_events_and_are_closed():
    sink = ListSink()
    with LossMonitor(sinks=[sink]) as monitor:
        monitor.update(0, loss=NAN)
    assert [("event" in r) for r in sink.records] == [False, True] and sink.closed
    assert Event.from_record(sink.records[1]) == monitor.events[0]
    silent = ListSink()
    with LossMonitor(sinks=[silent], write_sinks=False) as monitor:
        monitor.update(0, loss=1.0)
    assert silent.records == [] and silent.closed


# --- two real gloo processes versus one ------------------------------------------------------


def _distributed_data(n_steps: int = 300, seed: int = 0) -> list[dict[str, Any]]:
    """Per step, each rank's per-token losses (different counts), correct counts, and shared values."""
    rng = random.Random(seed)
    steps = []
    for step in range(n_steps):
        base = 2.0 + 3.0 * math.exp(-step / 150)
        ranks = []
        for rank in range(2):
            losses = [base + rng.gauss(0.0, 0.05) for _ in range(rng.randint(3, 9))]
            if step == 200 and rank == 0:
                losses = [3 * x for x in losses]  # a spike on one rank's share
            if step == 250 and rank == 1:
                losses[0] = NAN  # a NaN on one rank only: every rank must see it
            aux = [0.01 * (rank + 1)] * len(losses)
            ranks.append({"losses": losses, "aux": aux, "correct": rng.randint(0, len(losses))})
        steps.append(
            {
                "ranks": ranks,
                "grad_norm": 1.0 + rng.gauss(0.0, 0.05),
                "lr": 1e-3,
                "eval": [2.3 + 3.0 * math.exp(-step / 150) + rng.gauss(0, 0.01) for _ in range(6)]
                if step % 50 == 49
                else None,
            }
        )
    return steps


def _feed_distributed(monitor: LossMonitor, data: list[dict[str, Any]], ranks: list[int]) -> None:
    """Feed the shares of ``ranks`` (one rank under gloo, both in the single process)."""
    for step, item in enumerate(data):
        losses = [x for r in ranks for x in item["ranks"][r]["losses"]]
        aux = [x for r in ranks for x in item["ranks"][r]["aux"]]
        correct = sum(item["ranks"][r]["correct"] for r in ranks)
        mean = torch.tensor(losses, dtype=torch.float64).mean()
        monitor.update(
            step,
            loss=mean,
            tokens=torch.tensor(len(losses)),
            correct=correct,
            grad_norm=item["grad_norm"],
            lr=item["lr"],
            terms={"ce": mean, "aux": torch.tensor(aux, dtype=torch.float64).mean()},
        )
        if item["eval"] is not None:
            share = item["eval"][:2] if ranks == [0] else item["eval"][2:] if ranks == [1] else item["eval"]
            monitor.update_eval(step, loss=sum(share) / len(share), tokens=len(share), train_loss=2.0)


def _monitor_worker(rank: int, world_size: int, data: list[dict[str, Any]]) -> dict[str, Any]:
    sink = ListSink()
    monitor = LossMonitor(group=dist.group.WORLD, sinks=[sink], write_sinks=True, clock=FakeClock(), sync_every=5)
    _feed_distributed(monitor, data, [rank])
    monitor.close()
    return {"records": sink.records, "events": [e.to_record() for e in monitor.events]}


@pytest.mark.distributed
def test_two_gloo_processes_see_the_numbers_of_one_process_fed_everything():
    data = _distributed_data()
    single_sink = ListSink()
    single = LossMonitor(sinks=[single_sink], clock=FakeClock(), sync_every=5)
    _feed_distributed(single, data, [0, 1])
    single.close()
    assert kinds(single.events) == [(200, "spike", "train/loss"), (250, "nan", "train/loss")]
    # The eval split: 2 tokens on rank 0, 4 on rank 1; the token-weighted mean is the mean of all 6.
    for result in run_gloo(_monitor_worker, 2, data):
        assert [r["event"] if "event" in r else r["split"] for r in result["records"]] == [
            r["event"] if "event" in r else r["split"] for r in single_sink.records
        ]
        for got, expected in zip(result["records"], single_sink.records):
            assert ("train/loss_max" in got) == ("event" not in got and got["split"] == "train")
            if "train/loss_max" in got:  # beside the mean: the largest loss of one rank's share
                means = [math.fsum(r["losses"]) / len(r["losses"]) for r in data[got["step"]]["ranks"]]
                loss_max = got.pop("train/loss_max")
                assert loss_max == pytest.approx(max(means), rel=1e-12) or any(map(math.isnan, means))
                assert got["split"] == "train" and (got["step"] != 200 or loss_max > 1.3 * got["train/loss"])
            assert got.keys() == expected.keys()
            for key, value in expected.items():
                if isinstance(value, float):
                    assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15, nan_ok=True), (key, got["step"])
                elif key != "message":  # numbers printed in messages may differ in the last digit
                    assert got[key] == value, (key, got["step"])
        assert [Event.from_record(r).kind for r in result["events"]] == [e.kind for e in single.events]
