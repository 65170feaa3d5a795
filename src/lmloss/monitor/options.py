"""Checking ``LossMonitor``'s constructor arguments, so that a bad one fails at construction."""

from __future__ import annotations

from collections.abc import Sequence

from lmloss.monitor.detectors import (
    ConvergedRule,
    DivergenceRule,
    MaxRatioRule,
    OverfittingRule,
    PlateauRule,
    SpikeRule,
)

__all__ = ["check_monitor_options", "check_rules"]


def check_monitor_options(
    ema_weight: object, sync_every: object, sinks: object, write_sinks: object, clock: object
) -> None:
    """``LossMonitor``'s plain options: types and ranges, each error naming the option."""
    if isinstance(ema_weight, bool) or not isinstance(ema_weight, (int, float)):
        raise TypeError(f"ema_weight must be a number in [0, 1), got {ema_weight!r}")
    if not 0.0 <= ema_weight < 1.0:
        raise ValueError(f"ema_weight must be in [0, 1) (0 = no smoothing), got {ema_weight}")
    if sync_every is not None and (isinstance(sync_every, bool) or not isinstance(sync_every, int)):
        raise TypeError(f"sync_every must be None or an int >= 1, got {sync_every!r}")
    if isinstance(sync_every, int) and sync_every < 1:
        raise ValueError(f"sync_every must be >= 1 (1 reads every step), got {sync_every}")
    if isinstance(sinks, (str, bytes)) or not isinstance(sinks, Sequence):
        raise TypeError(f"sinks must be a list of sinks, got {type(sinks).__name__}")
    for sink in sinks:
        if not (callable(getattr(sink, "write", None)) and callable(getattr(sink, "close", None))):
            raise TypeError(f"a sink needs write(record) and close() methods; {sink!r} lacks them")
    if write_sinks is not None and not isinstance(write_sinks, bool):
        raise TypeError(f"write_sinks must be None or a bool, got {write_sinks!r}")
    if not callable(clock):
        raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")


def check_rules(**rules: object) -> None:
    """Each detector rule, by keyword, is ``None`` or an instance of its rule class."""
    expected = {
        "spike": SpikeRule,
        "max_ratio": MaxRatioRule,
        "divergence": DivergenceRule,
        "plateau": PlateauRule,
        "overfitting": OverfittingRule,
        "converged": ConvergedRule,
    }
    for name, rule in rules.items():
        if rule is not None and not isinstance(rule, expected[name]):
            raise TypeError(
                f"{name} must be a {expected[name].__name__} or None, got {type(rule).__name__}; "
                f"e.g. {name}={expected[name].__name__}(...)"
            )
