"""Detector checkpoints: the keys each detector saves, and what loading them restores."""

from __future__ import annotations

import json
import math

import pytest

from lmloss.monitor.detectors import (
    ConvergedDetector,
    ConvergedRule,
    DivergenceDetector,
    DivergenceRule,
    MaxRatioDetector,
    MaxRatioRule,
    OverfittingDetector,
    OverfittingRule,
    PlateauDetector,
    PlateauRule,
)

# The state keys (and their order) of monitors saved before the detectors shared one
# state_dict(): a resumed run reads them.
CASES = [
    (lambda: MaxRatioDetector(MaxRatioRule()), {"count": int, "max": float}),
    (lambda: DivergenceDetector(DivergenceRule()), {"min": float, "min_step": int, "active": bool}),
    (lambda: PlateauDetector(PlateauRule()), {"best": float, "best_step": int, "bad": int, "fired": bool}),
    (
        lambda: OverfittingDetector(OverfittingRule()),
        {"best": float, "best_step": int, "train_at_best": float, "gap_at_best": float, "count": int, "fired": bool},
    ),
    (lambda: ConvergedDetector(ConvergedRule(target_loss=1.0)), {"fired": bool}),
]


@pytest.mark.parametrize("make, types", CASES)
def test_state_keys_and_initial_values(make, types):
    state = make().state_dict()
    assert list(state) == list(types)
    assert all(isinstance(value, types[key]) for key, value in state.items())


@pytest.mark.parametrize("make, types", CASES)
def test_load_state_dict_converts_to_the_field_types(make, types):
    # JSON has no int/float distinction worth trusting, and bools may come back as 0/1.
    saved = {key: {int: 7.0, float: 2, bool: 1}[kind] for key, kind in types.items()}
    detector = make()
    detector.load_state_dict(json.loads(json.dumps(saved)))
    state = detector.state_dict()
    assert state == {key: kind(saved[key]) for key, kind in types.items()}
    assert all(type(value) is types[key] for key, value in state.items())


def test_detectors_decide_alike_after_a_round_trip():
    first = DivergenceDetector(DivergenceRule(warmup_steps=0))
    for step, value in enumerate([3.0, 2.0, 1.0]):
        assert first.check(step, "train/loss", value) is None
    second = DivergenceDetector(DivergenceRule(warmup_steps=0))
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    events = [d.check(3, "train/loss", 5.0) for d in (first, second)]
    assert events[0] is not None and events[0] == events[1]
    assert second.min == 1.0 and second.min_step == 2 and second.active


def test_detectors_compare_by_identity():
    a, b = PlateauDetector(PlateauRule()), PlateauDetector(PlateauRule())
    assert a != b and len({a, b}) == 2
    assert math.isinf(a.best) and a.best_step == -1
