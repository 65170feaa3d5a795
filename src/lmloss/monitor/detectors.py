"""Detectors: the rules that turn a stream of losses into events.

Each rule is a small frozen dataclass of thresholds (the configuration, with the
defaults the field uses) and each detector the state that rule needs (a window, a
best value, a counter), with ``state_dict()``/``load_state_dict()`` so a resumed
run decides exactly as an uninterrupted one. Detectors work on Python floats: the
monitor reads device values in batches and feeds them here in step order.

Where the defaults come from:

``SpikeRule``
    OLMo-core ``StabilityMonitorCallback``: a value is a spike if it exceeds ``mean +
    6 * std`` of the previous 128 values (population std), checked only once the
    window is full and skipped if ``std < 1e-10``; on the loss and the gradient norm.
``MaxRatioRule``
    Megatron-LM's spiky-loss check: ``x >= 10 * running max`` once 100 values were
    seen. Coarse on purpose: it catches garbage, not wobbles.
``DivergenceRule``
    OLMo's ``early_stopping_factor``: stop when the loss exceeds ``factor * min so
    far`` (after warm-up). OLMo ships it off (``None``); lmloss uses ``factor=2`` on the
    *smoothed* loss, plus an absolute margin (``min_delta=0.1`` nats) so that a loss
    near zero (0.001 -> 0.003) is not called divergent. Lightning's
    ``divergence_threshold`` is the absolute variant (``factor=1`` and ``min_delta``).
``PlateauRule``
    Lightning ``EarlyStopping``: ``patience=3`` checks, ``min_delta=0`` (absolute).
    transformers' ``EarlyStoppingCallback`` is the same test with
    ``early_stopping_threshold``; ``relative=True`` gives ReduceLROnPlateau's
    ``threshold_mode="rel"`` (its defaults: ``min_delta=1e-4``, ``patience=10``).
    Without evaluations (the usual pre-training run) the smoothed training loss is
    checked every ``AUTO_TRAIN_INTERVAL = 500`` steps until the first evaluation
    arrives: a loss that has not improved for 1,500 steps is reported (at most
    2,000 steps after it stopped improving); ``train_interval=None`` turns that off.
``OverfittingRule``
    nanoGPT's habit: estimate train and val loss on matched batches and watch ``val -
    train``. Fires when, for ``patience=3`` evaluations in a row, the eval loss is not
    below its best, the train loss is below its value at that best, and the gap is
    wider than it was then.
``ConvergedRule``
    No field-wide default exists: off unless a ``target_loss`` is given.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeGuard

from lmloss.monitor.events import Event

#: Steps between checks of the smoothed training loss with ``PlateauRule(train_interval="auto")``.
AUTO_TRAIN_INTERVAL = 500

__all__ = [
    "AUTO_TRAIN_INTERVAL",
    "ConvergedRule",
    "DivergenceRule",
    "MaxRatioRule",
    "OverfittingRule",
    "PlateauRule",
    "SpikeRule",
]

SPIKE_METRICS = ("loss", "grad_norm")


# --- rules (configuration) --------------------------------------------------------------


@dataclass(frozen=True)
class SpikeRule:
    """Spike = a value above ``mean + num_std * std`` of the previous ``window`` values.

    Attributes:
        window: number of previous values (OLMo-core: 128). Nothing is flagged until
            the window is full.
        num_std: how many population standard deviations above the mean (OLMo-core: 6).
        min_std: skip the test when the window's std is below this (OLMo-core: 1e-10):
            a constant series has no scale to measure a jump against.
        metrics: which series to watch: ``"loss"`` and/or ``"grad_norm"``.
    """

    window: int = 128
    num_std: float = 6.0
    min_std: float = 1e-10
    metrics: tuple[str, ...] = SPIKE_METRICS

    def __post_init__(self) -> None:
        _positive_int("SpikeRule.window", self.window, minimum=2)
        _non_negative("SpikeRule.num_std", self.num_std)
        _non_negative("SpikeRule.min_std", self.min_std)
        _metrics("SpikeRule.metrics", self.metrics)


@dataclass(frozen=True)
class MaxRatioRule:
    """Spike = a value at least ``factor`` times the largest value seen before it.

    Attributes:
        factor: Megatron-LM: 10.
        min_samples: values seen before the test starts (Megatron-LM: 100).
        metrics: which series to watch: ``"loss"`` and/or ``"grad_norm"``.
    """

    factor: float = 10.0
    min_samples: int = 100
    metrics: tuple[str, ...] = SPIKE_METRICS

    def __post_init__(self) -> None:
        _positive("MaxRatioRule.factor", self.factor)
        _positive_int("MaxRatioRule.min_samples", self.min_samples, minimum=1)
        _metrics("MaxRatioRule.metrics", self.metrics)


@dataclass(frozen=True)
class DivergenceRule:
    """Divergence = the loss above ``factor * min so far`` and ``min so far + min_delta``.

    Fires once when the loss crosses the limit, and again only after it came back
    below ``factor * min``.

    Attributes:
        factor: multiple of the minimum (OLMo's ``early_stopping_factor``); lmloss: 2.
        min_delta: the loss must also exceed the minimum by this many nats.
        warmup_steps: no test at or before this step (OLMo waits for the LR warm-up).
        smoothed: compare the debiased EMA of the loss (``True``, so that one spike
            is reported as a spike, not as divergence) or the raw loss (OLMo).
    """

    factor: float = 2.0
    min_delta: float = 0.1
    warmup_steps: int = 0
    smoothed: bool = True

    def __post_init__(self) -> None:
        _positive("DivergenceRule.factor", self.factor)
        if self.factor < 1.0:
            raise ValueError(f"DivergenceRule.factor must be >= 1 (a multiple of the minimum), got {self.factor}")
        _non_negative("DivergenceRule.min_delta", self.min_delta)
        _positive_int("DivergenceRule.warmup_steps", self.warmup_steps, minimum=0)
        _bool("DivergenceRule.smoothed", self.smoothed)


@dataclass(frozen=True)
class PlateauRule:
    """Plateau = no improvement for ``patience`` checks in a row.

    A check improves when ``value < best - min_delta`` (absolute, Lightning and
    transformers), or ``value < best * (1 - min_delta)`` with ``relative=True``
    (ReduceLROnPlateau). Fires once per plateau; an improvement re-arms it.

    Attributes:
        patience: checks without improvement (Lightning: 3; ReduceLROnPlateau: 10).
        min_delta: the smallest change that counts as an improvement (Lightning: 0).
        relative: ``min_delta`` is a fraction of the best value (ReduceLROnPlateau: 1e-4).
        train_interval: also check the smoothed *training* loss every this many
            steps; ``"auto"`` (default): every ``AUTO_TRAIN_INTERVAL`` (500) steps
            until the first evaluation arrives, then only evaluations (a run without
            evaluations still hears of a plateau); ``None``: only evaluations.
    """

    patience: int = 3
    min_delta: float = 0.0
    relative: bool = False
    train_interval: int | Literal["auto"] | None = "auto"

    def __post_init__(self) -> None:
        _positive_int("PlateauRule.patience", self.patience, minimum=1)
        _non_negative("PlateauRule.min_delta", self.min_delta)
        _bool("PlateauRule.relative", self.relative)
        if self.train_interval is not None and self.train_interval != "auto":
            _positive_int("PlateauRule.train_interval", self.train_interval, minimum=1)

    def interval(self, evaluated: bool) -> int | None:
        """Steps between checks of the training loss, given whether an evaluation arrived."""
        if self.train_interval == "auto":
            return None if evaluated else AUTO_TRAIN_INTERVAL
        return self.train_interval


@dataclass(frozen=True)
class OverfittingRule:
    """Overfitting = the eval-train gap widening while the train loss still falls.

    At each evaluation, the train reference is the ``train_loss`` given to
    ``update_eval`` (nanoGPT: the train loss estimated on as many batches as the
    eval loss), else the smoothed training loss. The rule counts evaluations in a
    row where the eval loss is not below its best (by ``min_delta``), the train
    reference is below its value at that best, and the gap ``eval - train`` exceeds
    the gap at that best by more than ``min_delta``; it fires at ``patience``.

    Attributes:
        patience: evaluations in a row (lmloss: 3, as Lightning's plateau patience).
        min_delta: nats by which the eval loss must improve to count as a new best,
            and by which the gap must widen to count.
    """

    patience: int = 3
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        _positive_int("OverfittingRule.patience", self.patience, minimum=1)
        _non_negative("OverfittingRule.min_delta", self.min_delta)


@dataclass(frozen=True)
class ConvergedRule:
    """Converged = the smoothed train loss or an eval loss at or below ``target_loss``.

    Fires once per split.
    """

    target_loss: float

    def __post_init__(self) -> None:
        _finite("ConvergedRule.target_loss", self.target_loss)


# --- detectors (state) ------------------------------------------------------------------

# How a saved scalar is read back, by the annotation of its field.
_SCALAR_TYPES: dict[str, type] = {"float": float, "int": int, "bool": bool}


@dataclass(eq=False)
class _ScalarStateDetector:
    """A detector whose state is its dataclass fields after ``rule``: plain floats, ints
    and bools, saved as they are and read back through their annotated type.

    ``eq=False``: detectors compare (and hash) by identity, as plain objects do.
    """

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rule"}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for f in fields(self):
            if f.name != "rule":
                setattr(self, f.name, _SCALAR_TYPES[str(f.type)](state[f.name]))


class WindowSpikeDetector:
    """``SpikeRule`` on one series."""

    def __init__(self, rule: SpikeRule) -> None:
        self.rule = rule
        self.history: deque[float] = deque(maxlen=rule.window)

    def check(self, step: int, metric: str, value: float) -> Event | None:
        """Test ``value`` against the previous values, then add it to the window."""
        event = None
        if len(self.history) == self.rule.window:
            mean = math.fsum(self.history) / len(self.history)
            std = math.sqrt(math.fsum((x - mean) ** 2 for x in self.history) / len(self.history))
            limit = mean + self.rule.num_std * std
            if std >= self.rule.min_std and value > limit:
                message = (
                    f"step {step}: {metric} spiked to {value:.4g}, above {limit:.4g} = mean {mean:.4g} + "
                    f"{self.rule.num_std:g} x std {std:.3g} of the previous {self.rule.window} steps"
                )
                event = Event(step, "spike", message, metric.split("/")[0], metric, value, limit)
        # The value joins the window even when it is a spike, as in OLMo-core.
        self.history.append(value)
        return event

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = deque((float(x) for x in state["history"]), maxlen=self.rule.window)


@dataclass(eq=False)
class MaxRatioDetector(_ScalarStateDetector):
    """``MaxRatioRule`` on one series."""

    rule: MaxRatioRule
    count: int = 0
    max: float = -math.inf

    def check(self, step: int, metric: str, value: float) -> Event | None:
        event = None
        limit = self.rule.factor * self.max
        # A running max <= 0 gives no scale (every value would be a "spike").
        if self.count >= self.rule.min_samples and self.max > 0 and value >= limit:
            message = (
                f"step {step}: {metric} jumped to {value:.4g}, at least {self.rule.factor:g} x its running "
                f"maximum {self.max:.4g} over {self.count} steps"
            )
            event = Event(step, "spike", message, metric.split("/")[0], metric, value, limit)
        self.count += 1
        self.max = max(self.max, value)
        return event


@dataclass(eq=False)
class DivergenceDetector(_ScalarStateDetector):
    """``DivergenceRule`` on the training loss."""

    rule: DivergenceRule
    min: float = math.inf
    min_step: int = -1
    active: bool = False

    def check(self, step: int, metric: str, value: float) -> Event | None:
        event = None
        limit = max(self.rule.factor * self.min, self.min + self.rule.min_delta)
        if step > self.rule.warmup_steps and math.isfinite(self.min):
            if value > limit and not self.active:
                self.active = True
                message = (
                    f"step {step}: {metric} is {value:.4g}, above {self.rule.factor:g} x its minimum "
                    f"{self.min:.4g} (step {self.min_step}): training is diverging"
                )
                event = Event(step, "divergence", message, "train", metric, value, limit)
            elif value <= self.rule.factor * self.min:
                self.active = False
        if value < self.min:
            self.min, self.min_step = value, step
        return event


@dataclass(eq=False)
class PlateauDetector(_ScalarStateDetector):
    """``PlateauRule`` on one series of checks (evaluations, or sampled train losses)."""

    rule: PlateauRule
    best: float = math.inf
    best_step: int = -1
    bad: int = 0
    fired: bool = False

    def improves(self, value: float) -> bool:
        if not math.isfinite(self.best):
            return True
        if self.rule.relative:
            return value < self.best - self.rule.min_delta * abs(self.best)
        return value < self.best - self.rule.min_delta

    def check(self, step: int, metric: str, value: float, *, what: str) -> Event | None:
        if self.improves(value):
            self.best, self.best_step, self.bad, self.fired = value, step, 0, False
            return None
        self.bad += 1
        if self.bad < self.rule.patience or self.fired:
            return None
        self.fired = True
        delta = f"{self.rule.min_delta:g}" + (" (relative)" if self.rule.relative else "")
        message = (
            f"step {step}: {metric} has not improved by more than {delta} for {self.bad} {what} "
            f"(best {self.best:.4g} at step {self.best_step}, now {value:.4g})"
        )
        return Event(step, "plateau", message, metric.split("/")[0], metric, value, self.best)


@dataclass(eq=False)
class OverfittingDetector(_ScalarStateDetector):
    """``OverfittingRule`` on evaluations."""

    rule: OverfittingRule
    best: float = math.inf
    best_step: int = -1
    train_at_best: float = math.nan
    gap_at_best: float = math.nan
    count: int = 0
    fired: bool = False

    def check(self, step: int, value: float, train: float) -> Event | None:
        gap = value - train
        if not math.isfinite(self.best) or value < self.best - self.rule.min_delta:
            self.best, self.best_step, self.train_at_best, self.gap_at_best = value, step, train, gap
            self.count, self.fired = 0, False
            return None
        widening = train < self.train_at_best and gap > self.gap_at_best + self.rule.min_delta
        self.count = self.count + 1 if widening else 0
        if self.count < self.rule.patience or self.fired:
            return None
        self.fired = True
        message = (
            f"step {step}: eval loss is {value:.4g} (best {self.best:.4g} at step {self.best_step}) while the "
            f"train loss fell from {self.train_at_best:.4g} to {train:.4g}; the eval - train gap widened from "
            f"{self.gap_at_best:.4g} to {gap:.4g} over {self.count} evaluations: the model is overfitting"
        )
        return Event(step, "overfitting", message, "eval", "eval/loss", value, self.best)


@dataclass(eq=False)
class ConvergedDetector(_ScalarStateDetector):
    """``ConvergedRule`` on one series."""

    rule: ConvergedRule
    fired: bool = False

    def check(self, step: int, metric: str, value: float) -> Event | None:
        if self.fired or value > self.rule.target_loss:
            return None
        self.fired = True
        message = f"step {step}: {metric} reached {value:.4g}, at or below the target {self.rule.target_loss:g}"
        return Event(step, "converged", message, metric.split("/")[0], metric, value, self.rule.target_loss)


# --- argument checks --------------------------------------------------------------------


def _is_real(value: object) -> TypeGuard[int | float]:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _finite(name: str, value: object) -> float:
    """Checks ``value`` is a finite int or float; returns it unchanged (an int stays an int)."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _non_negative(name: str, value: object) -> None:
    if _finite(name, value) < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _positive(name: str, value: object) -> None:
    if _finite(name, value) <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _positive_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _metrics(name: str, value: object) -> None:
    if isinstance(value, str) or not isinstance(value, tuple):
        raise TypeError(f"{name} must be a tuple of metric names, e.g. ('loss', 'grad_norm'), got {value!r}")
    unknown = [m for m in value if m not in SPIKE_METRICS]
    if unknown:
        raise ValueError(f"{name} has unknown metric(s) {unknown}; choose among {SPIKE_METRICS}")
