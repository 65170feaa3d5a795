"""Curricula: values that follow the optimizer step (term weights, data-source mixes).

A schedule maps an optimizer step (an ``int >= 0``) to a float. It also remembers a
*current step* (``set_step``), so that ``value()`` with no argument answers for the
step training is at, and ``state_dict()`` holds everything needed to resume: the
definition (kind and numbers) and the current step. The state holds only Python
ints, floats, strings, lists and dicts, so it survives ``torch.save``/``torch.load``
(``weights_only=True`` too) and JSON exactly; ``schedule_from_state`` rebuilds a
schedule from it without knowing its class in advance.

Kinds:

* ``ConstantSchedule(v)``
* ``LinearSchedule(start, end, start_step, end_step)``: ``start`` until
  ``start_step``, a straight line to ``end`` at ``end_step``, ``end`` afterwards.
* ``CosineSchedule(start, end, start_step, end_step)``: the same ends, half a cosine
  in between (``end + (start - end) * (1 + cos(pi * p)) / 2``, ``p`` the progress).
* ``StepSchedule([(0, v0), (s1, v1), ...])``: stages; the value of the last stage
  that has started.
* ``PiecewiseLinearSchedule([(s0, v0), (s1, v1), ...])``: straight lines between the
  points, constant before the first and after the last.

The mix of data sources is a ``MixtureSchedule`` (one schedule per source,
normalized to probabilities at each step); ``MixtureSampler`` draws the source of
every sample from a seed and the step alone, so a resumed run draws the sequence an
uninterrupted run would have drawn; ``MixtureIterator`` reads map-style sources
(``len`` and ``[i]``, e.g. a ``torch.utils.data.Dataset``) in that order.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import numbers
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

__all__ = [
    "ConstantSchedule",
    "CosineSchedule",
    "LinearSchedule",
    "MixtureIterator",
    "MixtureSampler",
    "MixtureSchedule",
    "PiecewiseLinearSchedule",
    "Schedule",
    "StepSchedule",
    "schedule_from_state",
]


# --- argument checks ------------------------------------------------------------------


def check_step(name: str, step: object) -> int:
    """An optimizer step: an ``int >= 0`` (not a bool)."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise ValueError(f"{name} must be an int optimizer step >= 0, got {step!r}")
    if step < 0:
        raise ValueError(f"{name} must be >= 0, got {step}")
    return int(step)


def check_finite(name: str, value: object) -> float:
    """A finite real number, returned as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_points(name: str, points: object) -> list[list[Any]]:
    """``[(step, value), ...]`` with strictly increasing steps, as ``[[int, float], ...]``."""
    if isinstance(points, (str, bytes)) or not isinstance(points, Sequence) or len(points) == 0:
        raise ValueError(f"{name} must be a non-empty list of (step, value) pairs, got {points!r}")
    checked: list[list[Any]] = []
    for i, point in enumerate(points):
        if isinstance(point, (str, bytes)) or not isinstance(point, Sequence) or len(point) != 2:
            raise ValueError(f"{name}[{i}] must be a (step, value) pair, got {point!r}")
        step = check_step(f"{name}[{i}] step", point[0])
        value = check_finite(f"{name}[{i}] value", point[1])
        if checked and step <= checked[-1][0]:
            raise ValueError(
                f"{name} steps must be strictly increasing, but {name}[{i}] has step {step} after step {checked[-1][0]}"
            )
        checked.append([step, value])
    return checked


# --- schedules ------------------------------------------------------------------------


class Schedule:
    """A float that depends on the optimizer step; subclasses define ``_at(step)``.

    ``value(step)`` answers for a given step; ``value()`` (or calling the schedule)
    for the current step, which ``set_step`` moves. The value at a step never
    depends on the current step or on earlier calls.
    """

    kind: ClassVar[str] = ""

    def __init__(self) -> None:
        self._step = 0

    @property
    def current_step(self) -> int:
        """The step ``value()`` answers for (0 until ``set_step`` is called)."""
        return self._step

    def set_step(self, step: int) -> None:
        """Move the current step (an ``int >= 0``); going back is allowed."""
        self._step = check_step("step", step)

    def value(self, step: int | None = None) -> float:
        """The value at ``step``, or at the current step when ``step`` is None."""
        return self._at(self._step if step is None else check_step("step", step))

    def __call__(self, step: int | None = None) -> float:
        return self.value(step)

    def _at(self, step: int) -> float:
        raise NotImplementedError

    def definition(self) -> dict[str, Any]:
        """The constructor arguments, as plain Python values."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """``{"type", "definition", "step"}``: enough to rebuild this schedule exactly."""
        return {"type": self.kind, "definition": self.definition(), "step": self._step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the definition and current step of ``state`` (from a schedule of this kind)."""
        restored = schedule_from_state(state)
        if type(restored) is not type(self):
            raise ValueError(
                f"cannot load a {state.get('type')!r} schedule state into a {type(self).__name__}; "
                f"use schedule_from_state(state) to rebuild it whatever its kind"
            )
        vars(self).update(vars(restored))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.definition().items())
        return f"{type(self).__name__}({args})"


class ConstantSchedule(Schedule):
    """The same value at every step."""

    kind = "constant"

    def __init__(self, value: float) -> None:
        super().__init__()
        self._value = check_finite("value", value)

    def _at(self, step: int) -> float:
        return self._value

    def definition(self) -> dict[str, Any]:
        return {"value": self._value}


class _Ramp(Schedule):
    """``start`` until ``start_step``, ``end`` from ``end_step``; ``_shape(p)`` in between."""

    def __init__(self, start: float, end: float, start_step: int, end_step: int) -> None:
        super().__init__()
        self._start = check_finite("start", start)
        self._end = check_finite("end", end)
        self._start_step = check_step("start_step", start_step)
        self._end_step = check_step("end_step", end_step)
        if self._end_step <= self._start_step:
            raise ValueError(
                f"end_step ({self._end_step}) must be greater than start_step ({self._start_step}); "
                f"use StepSchedule for a jump"
            )

    def _at(self, step: int) -> float:
        if step <= self._start_step:
            return self._start
        if step >= self._end_step:
            return self._end
        progress = (step - self._start_step) / (self._end_step - self._start_step)
        return self._shape(progress)

    def _shape(self, progress: float) -> float:
        raise NotImplementedError

    def definition(self) -> dict[str, Any]:
        return {"start": self._start, "end": self._end, "start_step": self._start_step, "end_step": self._end_step}


class LinearSchedule(_Ramp):
    """A linear ramp from ``start`` (at ``start_step``) to ``end`` (at ``end_step``).

    Example: ``LinearSchedule(0.0, 1.0, 100, 200)`` is 0 up to step 100, 0.5 at
    step 150 and 1 from step 200 on.
    """

    kind = "linear"

    def _shape(self, progress: float) -> float:
        return self._start + (self._end - self._start) * progress


class CosineSchedule(_Ramp):
    """Half a cosine from ``start`` (at ``start_step``) to ``end`` (at ``end_step``).

    ``value = end + (start - end) * (1 + cos(pi * p)) / 2`` with
    ``p = (step - start_step) / (end_step - start_step)``, clamped to [0, 1].
    """

    kind = "cosine"

    def _shape(self, progress: float) -> float:
        return self._end + (self._start - self._end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class StepSchedule(Schedule):
    """Stages: ``[(0, v0), (s1, v1), ...]``; from step ``s_i`` on the value is ``v_i``.

    Steps must be strictly increasing and the first stage must start at step 0,
    so every step has a value.
    """

    kind = "stages"

    def __init__(self, stages: Sequence[tuple[int, float]]) -> None:
        super().__init__()
        self._stages = _check_points("stages", stages)
        if self._stages[0][0] != 0:
            raise ValueError(
                f"the first stage must start at step 0 (got step {self._stages[0][0]}), so that every step has a value"
            )

    def _at(self, step: int) -> float:
        value = self._stages[0][1]
        for start, stage_value in self._stages:
            if start > step:
                break
            value = stage_value
        return value

    def definition(self) -> dict[str, Any]:
        return {"stages": [list(p) for p in self._stages]}


class PiecewiseLinearSchedule(Schedule):
    """Straight lines through ``[(s0, v0), (s1, v1), ...]``; constant outside the points."""

    kind = "piecewise"

    def __init__(self, points: Sequence[tuple[int, float]]) -> None:
        super().__init__()
        self._points = _check_points("points", points)

    def _at(self, step: int) -> float:
        points = self._points
        if step <= points[0][0]:
            return points[0][1]
        for (s0, v0), (s1, v1) in itertools.pairwise(points):
            if step <= s1:
                return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
        return points[-1][1]

    def definition(self) -> dict[str, Any]:
        return {"points": [list(p) for p in self._points]}


_KINDS: dict[str, type[Schedule]] = {
    cls.kind: cls for cls in (ConstantSchedule, LinearSchedule, CosineSchedule, StepSchedule, PiecewiseLinearSchedule)
}


def schedule_from_state(state: Mapping[str, Any]) -> Schedule:
    """Rebuild a schedule (of any built-in kind) from its ``state_dict()``."""
    if not isinstance(state, Mapping) or not {"type", "definition", "step"} <= set(state):
        raise ValueError(f"a schedule state is a dict with 'type', 'definition' and 'step', got {state!r}")
    cls = _KINDS.get(state["type"])
    if cls is None:
        raise ValueError(f"unknown schedule type {state['type']!r}; known: {', '.join(sorted(_KINDS))}")
    schedule = cls(**state["definition"])
    schedule.set_step(state["step"])
    return schedule


def as_schedule(name: str, value: float | Schedule) -> Schedule:
    """A schedule as is, or a number as a ``ConstantSchedule``."""
    if isinstance(value, Schedule):
        return value
    return ConstantSchedule(check_finite(name, value))


# --- data-source mixtures -------------------------------------------------------------


class MixtureSchedule:
    """Per-source sampling probabilities that follow the optimizer step.

    Args:
        weights: source name -> a non-negative weight or a ``Schedule`` of weights.
            At each step the weights are divided by their sum, so they need not sum
            to 1 (``{"chat": 3, "boxes": 1}`` is 75% / 25%).

    Example: start on plain chat, bring grounding data in between steps 1000 and 2000::

        mix = MixtureSchedule({"chat": 1.0, "boxes": LinearSchedule(0.0, 1.0, 1000, 2000)})
        mix.probabilities(1500)   # {"chat": 0.667, "boxes": 0.333}
    """

    def __init__(self, weights: Mapping[str, float | Schedule]) -> None:
        if not isinstance(weights, Mapping) or len(weights) == 0:
            raise ValueError(f"weights must be a non-empty dict of source name -> weight, got {weights!r}")
        self._sources: dict[str, Schedule] = {}
        for name, weight in weights.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"source names must be non-empty strings, got {name!r}")
            self._sources[name] = as_schedule(f"weight of source {name!r}", weight)
        self._step = 0

    @property
    def names(self) -> tuple[str, ...]:
        """Source names, in definition order (the order draws are made in)."""
        return tuple(self._sources)

    @property
    def current_step(self) -> int:
        return self._step

    def set_step(self, step: int) -> None:
        """Move the current step of this mixture and of every source's schedule."""
        self._step = check_step("step", step)
        for schedule in self._sources.values():
            schedule.set_step(self._step)

    def probabilities(self, step: int | None = None) -> dict[str, float]:
        """Source name -> probability at ``step`` (the current step when None); they sum to 1."""
        step = self._step if step is None else check_step("step", step)
        weights = {name: schedule.value(step) for name, schedule in self._sources.items()}
        for name, weight in weights.items():
            if weight < 0:
                raise ValueError(f"source {name!r} has a negative weight {weight} at step {step}")
        total = math.fsum(weights.values())
        if total <= 0:
            raise ValueError(f"every source has weight 0 at step {step}: nothing to sample from")
        return {name: weight / total for name, weight in weights.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "type": "mixture",
            "sources": {name: schedule.state_dict() for name, schedule in self._sources.items()},
            "step": self._step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the sources, their schedules and the current step with those of ``state``."""
        if not isinstance(state, Mapping) or state.get("type") != "mixture":
            raise ValueError(f"not a MixtureSchedule state: {state!r}")
        sources = {name: schedule_from_state(s) for name, s in state["sources"].items()}
        if not sources:
            raise ValueError("a MixtureSchedule state must name at least one source")
        self._sources = sources
        self.set_step(state["step"])

    def __repr__(self) -> str:
        return f"MixtureSchedule({self._sources!r})"


class MixtureSampler:
    """Draws data sources from a ``MixtureSchedule``, deterministically.

    The draws of a step depend only on ``(seed, stream, step)`` and the schedule:
    a run resumed at step ``s`` draws what an uninterrupted run drew at ``s``, in
    any process, on any machine (Python's ``random.Random``, seeded by a SHA-256 of
    those three numbers, so no global RNG is touched).

    Args:
        schedule: the mixture to follow.
        seed: the run's seed.
    """

    schedule: MixtureSchedule
    seed: int

    def __init__(self, schedule: MixtureSchedule, seed: int = 0) -> None:
        if not isinstance(schedule, MixtureSchedule):
            raise ValueError(f"schedule must be a MixtureSchedule, got {type(schedule).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.schedule = schedule
        self.seed = int(seed)

    def _rng(self, step: int, stream: int) -> random.Random:
        digest = hashlib.sha256(f"lmloss.mixture/{self.seed}/{stream}/{step}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def draw(self, step: int, n: int, *, stream: int = 0) -> list[str]:
        """The sources of the ``n`` samples of optimizer step ``step``.

        Args:
            step: the optimizer step (its mixture probabilities are used).
            n: samples in that step (e.g. the per-rank batch size).
            stream: an independent sequence per stream, e.g. the data-parallel rank,
                so ranks do not all draw the same sources.
        """
        step = check_step("step", step)
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if isinstance(stream, bool) or not isinstance(stream, numbers.Integral):
            raise ValueError(f"stream must be an int, got {stream!r}")
        probabilities = self.schedule.probabilities(step)
        return self._rng(step, int(stream)).choices(list(probabilities), weights=list(probabilities.values()), k=n)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.schedule.load_state_dict(state["schedule"])


class MixtureIterator(Iterator[tuple[str, Any]]):
    """An endless stream of ``(source_name, item)`` mixed by a ``MixtureSampler``.

    Sample ``i`` belongs to optimizer step ``i // samples_per_step`` and its source
    is ``sampler.draw(step, samples_per_step, stream=stream)[i % samples_per_step]``.
    Each source is read in order, item 0, 1, 2, ..., and starts again from 0 when
    exhausted (shuffle a source yourself if you want another order). Sources are
    map-style (``len(source)`` and ``source[i]``), so resuming needs no replay:
    ``state_dict()`` records how many samples were drawn and how many items each
    source gave.

    Args:
        sources: source name -> a sequence or map-style dataset; the names must be
            those of the sampler's mixture.
        sampler: decides the source of each sample.
        samples_per_step: samples per optimizer step (per rank).
        stream: passed to ``sampler.draw`` (e.g. the data-parallel rank).
    """

    def __init__(
        self,
        sources: Mapping[str, Sequence[Any]],
        sampler: MixtureSampler,
        samples_per_step: int,
        *,
        stream: int = 0,
    ) -> None:
        if set(sources) != set(sampler.schedule.names):
            raise ValueError(
                f"sources {sorted(sources)} must be the sources of the mixture, {sorted(sampler.schedule.names)}"
            )
        for name, source in sources.items():
            if len(source) == 0:
                raise ValueError(f"source {name!r} is empty")
        if isinstance(samples_per_step, bool) or not isinstance(samples_per_step, int) or samples_per_step < 1:
            raise ValueError(f"samples_per_step must be an int >= 1, got {samples_per_step!r}")
        self.sources = dict(sources)
        self.sampler = sampler
        self.samples_per_step = samples_per_step
        self.stream = stream
        self._drawn = 0
        self._consumed = dict.fromkeys(sources, 0)
        self._cache: tuple[int, list[str]] | None = None

    @property
    def step(self) -> int:
        """The optimizer step of the next sample."""
        return self._drawn // self.samples_per_step

    @property
    def consumed(self) -> dict[str, int]:
        """Items taken from each source so far."""
        return dict(self._consumed)

    def __next__(self) -> tuple[str, Any]:
        step = self.step
        if self._cache is None or self._cache[0] != step:
            self._cache = (step, self.sampler.draw(step, self.samples_per_step, stream=self.stream))
        name = self._cache[1][self._drawn % self.samples_per_step]
        source = self.sources[name]
        item = source[self._consumed[name] % len(source)]
        self._consumed[name] += 1
        self._drawn += 1
        return name, item

    def state_dict(self) -> dict[str, Any]:
        return {
            "samples_drawn": self._drawn,
            "consumed": dict(self._consumed),
            "samples_per_step": self.samples_per_step,
            "stream": self.stream,
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # Check before changing anything, so a refused state leaves this iterator intact.
        for what, names in (("consumed", state["consumed"]), ("mixture", state["sampler"]["schedule"]["sources"])):
            if set(names) != set(self.sources):
                raise ValueError(f"the state's {what} sources {sorted(names)} differ from {sorted(self.sources)}")
        self.sampler.load_state_dict(state["sampler"])
        self.samples_per_step = int(state["samples_per_step"])
        self.stream = int(state["stream"])
        self._drawn = int(state["samples_drawn"])
        self._consumed = {name: int(n) for name, n in state["consumed"].items()}
        self._cache = None
