"""Schedules, mixtures and the deterministic source sampler, against hand values."""

from __future__ import annotations

import io
import json
import math
import re

import pytest
import torch

from lmloss.multitask import (
    ConstantSchedule,
    CosineSchedule,
    LinearSchedule,
    MixtureIterator,
    MixtureSampler,
    MixtureSchedule,
    PiecewiseLinearSchedule,
    StepSchedule,
    schedule_from_state,
)


def _through_torch_save(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- values at given steps (hand values) ------------------------------------------------


def test_constant_and_linear_values():
    assert [ConstantSchedule(0.25).value(s) for s in (0, 7, 10**9)] == [0.25, 0.25, 0.25]
    ramp = LinearSchedule(0.0, 1.0, 100, 200)
    expected = {0: 0.0, 100: 0.0, 150: 0.5, 175: 0.75, 200: 1.0, 10_000: 1.0}
    assert {s: ramp.value(s) for s in expected} == expected
    down = LinearSchedule(2.0, 1.0, 0, 4)
    assert [down.value(s) for s in range(6)] == [2.0, 1.75, 1.5, 1.25, 1.0, 1.0]


def test_cosine_values():
    cosine = CosineSchedule(1.0, 0.0, 0, 100)
    assert cosine.value(0) == 1.0 and cosine.value(100) == 0.0 and cosine.value(500) == 0.0
    assert cosine.value(50) == pytest.approx(0.5, abs=1e-15)
    # Quarter way: (1 + cos(pi/4)) / 2 = (1 + sqrt(2)/2) / 2.
    assert cosine.value(25) == pytest.approx((1 + math.sqrt(2) / 2) / 2, abs=1e-15)
    warm = CosineSchedule(0.0, 4.0, 10, 20)
    assert warm.value(5) == 0.0 and warm.value(15) == pytest.approx(2.0, abs=1e-14)


def test_stages_and_piecewise_values():
    stages = StepSchedule([(0, 1.0), (10, 0.5), (20, 0.1)])
    assert [stages.value(s) for s in (0, 9, 10, 19, 20, 1000)] == [1.0, 1.0, 0.5, 0.5, 0.1, 0.1]
    piecewise = PiecewiseLinearSchedule([(10, 0.0), (20, 1.0), (40, 0.0)])
    expected = {0: 0.0, 10: 0.0, 15: 0.5, 20: 1.0, 30: 0.5, 35: 0.25, 40: 0.0, 99: 0.0}
    assert {s: piecewise.value(s) for s in expected} == expected


def test_current_step_is_what_value_answers_for():
    ramp = LinearSchedule(0.0, 1.0, 0, 10)
    assert ramp.current_step == 0 and ramp() == 0.0
    ramp.set_step(3)
    assert ramp.current_step == 3 and ramp() == ramp.value() == pytest.approx(0.3)
    assert ramp.value(10) == 1.0 and ramp.current_step == 3  # asking another step moves nothing
    ramp.set_step(1)  # going back (e.g. a rollback) is allowed
    assert ramp() == pytest.approx(0.1)


# --- checkpoints --------------------------------------------------------------------------

SCHEDULES = [
    lambda: ConstantSchedule(0.3),
    lambda: LinearSchedule(0.1, 0.7, 3, 17),
    lambda: CosineSchedule(1.0, 1e-3, 5, 29),
    lambda: StepSchedule([(0, 1.0), (4, 0.3), (11, 1.0 / 3.0)]),
    lambda: PiecewiseLinearSchedule([(2, 0.1), (9, 0.9), (20, 0.2)]),
]


@pytest.mark.parametrize("make", SCHEDULES)
def test_schedule_round_trip_is_exact(make):
    schedule = make()
    schedule.set_step(13)
    state = schedule.state_dict()
    for restored_state in (state, _through_torch_save(state), json.loads(json.dumps(state))):
        rebuilt = schedule_from_state(restored_state)
        assert type(rebuilt) is type(schedule) and rebuilt.current_step == 13
        assert [rebuilt.value(s) for s in range(40)] == [schedule.value(s) for s in range(40)]
        assert rebuilt.state_dict() == state
    # load_state_dict into another object of the same kind replaces its definition too.
    other = make()
    other.load_state_dict(_through_torch_save(state))
    assert [other.value(s) for s in range(40)] == [schedule.value(s) for s in range(40)] and other() == schedule()


def test_load_state_dict_refuses_another_kind():
    with pytest.raises(ValueError, match="cannot load a 'linear' schedule state into a CosineSchedule"):
        CosineSchedule(0.0, 1.0, 0, 1).load_state_dict(LinearSchedule(0.0, 1.0, 0, 1).state_dict())
    with pytest.raises(ValueError, match="unknown schedule type 'exp'"):
        schedule_from_state({"type": "exp", "definition": {}, "step": 0})


def test_schedule_bad_input():
    with pytest.raises(ValueError, match=r"strictly increasing, but stages\[2\] has step 5 after step 10"):
        StepSchedule([(0, 1.0), (10, 0.5), (5, 0.1)])
    with pytest.raises(ValueError, match="strictly increasing"):
        PiecewiseLinearSchedule([(0, 1.0), (0, 0.5)])
    with pytest.raises(ValueError, match="first stage must start at step 0"):
        StepSchedule([(5, 1.0)])
    with pytest.raises(ValueError, match="non-empty list"):
        StepSchedule([])
    with pytest.raises(ValueError, match=r"end_step \(10\) must be greater than start_step \(10\)"):
        LinearSchedule(0.0, 1.0, 10, 10)
    with pytest.raises(ValueError, match="must be finite"):
        ConstantSchedule(float("nan"))
    with pytest.raises(ValueError, match="step must be >= 0"):
        ConstantSchedule(1.0).value(-1)
    with pytest.raises(ValueError, match="int optimizer step"):
        ConstantSchedule(1.0).set_step(1.5)  # type: ignore[arg-type]  # a wrong type on purpose


# --- mixtures -------------------------------------------------------------------------------


def _mixture():
    return MixtureSchedule({"chat": 1.0, "boxes": LinearSchedule(0.0, 1.0, 0, 100), "math": 0.5})


def test_mixture_probabilities_are_normalized_weights():
    mix = _mixture()
    assert mix.probabilities(0) == {"chat": 1.0 / 1.5, "boxes": 0.0, "math": 0.5 / 1.5}
    at_50 = mix.probabilities(50)
    assert at_50 == pytest.approx({"chat": 1.0 / 2.0, "boxes": 0.5 / 2.0, "math": 0.5 / 2.0}, abs=1e-15)
    mix.set_step(100)
    assert mix.probabilities() == pytest.approx({"chat": 0.4, "boxes": 0.4, "math": 0.2}, abs=1e-15)


def test_mixture_bad_weights():
    with pytest.raises(ValueError, match=re.escape("source 'b' has a negative weight -1.0 at step 3")):
        MixtureSchedule({"a": 1.0, "b": LinearSchedule(0.0, -2.0, 1, 5)}).probabilities(3)
    with pytest.raises(ValueError, match="every source has weight 0 at step 0"):
        MixtureSchedule({"a": 0.0, "b": LinearSchedule(0.0, 1.0, 0, 5)}).probabilities(0)
    with pytest.raises(ValueError, match="non-empty dict"):
        MixtureSchedule({})


def test_mixture_round_trip():
    mix = _mixture()
    mix.set_step(42)
    other = MixtureSchedule({"x": 1.0})
    other.load_state_dict(_through_torch_save(mix.state_dict()))
    assert other.names == mix.names and other.current_step == 42
    assert all(other.probabilities(s) == mix.probabilities(s) for s in range(0, 150, 7))


def test_sampler_is_deterministic_in_seed_and_step():
    sampler = MixtureSampler(_mixture(), seed=7)
    first = [sampler.draw(s, 16) for s in range(5)]
    # Order of the calls does not matter, nor the object: only (seed, stream, step).
    again = MixtureSampler(_mixture(), seed=7)
    assert [again.draw(s, 16) for s in reversed(range(5))][::-1] == first
    assert MixtureSampler(_mixture(), seed=8).draw(3, 16) != first[3]
    assert sampler.draw(3, 16, stream=1) != first[3]
    assert "boxes" not in sampler.draw(0, 500)  # weight 0 at step 0


def test_sampler_frequencies_follow_the_schedule():
    sampler = MixtureSampler(_mixture(), seed=0)
    n = 20_000
    for step in (30, 100):
        draws = sampler.draw(step, n)
        for name, p in _mixture().probabilities(step).items():
            frequency = draws.count(name) / n
            sigma = math.sqrt(p * (1 - p) / n)
            assert abs(frequency - p) < 4 * sigma, (step, name, frequency, p)


def test_iterator_reads_sources_in_order_and_resumes_exactly():
    sources = {"chat": [f"c{i}" for i in range(5)], "boxes": [f"b{i}" for i in range(3)], "math": ["m0"]}
    sampler = MixtureSampler(_mixture(), seed=3)
    run = MixtureIterator(sources, sampler, samples_per_step=8)
    head = [next(run) for _ in range(37)]
    # The sources are those the sampler draws, step by step; each source is read in order and cycles.
    drawn = [name for s in range(5) for name in sampler.draw(s, 8)][:37]
    assert [name for name, _ in head] == drawn
    for name, items in sources.items():
        got = [item for n, item in head if n == name]
        assert got == [items[i % len(items)] for i in range(len(got))]
    assert run.step == 4 and sum(run.consumed.values()) == 37

    state = _through_torch_save(run.state_dict())
    resumed = MixtureIterator(sources, MixtureSampler(_mixture(), seed=99), samples_per_step=8)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(30)] == [next(run) for _ in range(30)]


def test_iterator_bad_input():
    sampler = MixtureSampler(MixtureSchedule({"a": 1.0, "b": 1.0}))
    with pytest.raises(ValueError, match="must be the sources of the mixture"):
        MixtureIterator({"a": [1]}, sampler, 4)
    with pytest.raises(ValueError, match="source 'b' is empty"):
        MixtureIterator({"a": [1], "b": []}, sampler, 4)
    with pytest.raises(ValueError, match="samples_per_step must be an int >= 1"):
        MixtureIterator({"a": [1], "b": [2]}, sampler, 0)
