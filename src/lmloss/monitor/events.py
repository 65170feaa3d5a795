"""What the monitor reports: an ``Event`` is one detection at one step.

Events are plain, immutable values: they compare equal field by field (so a resumed
run can be checked against an uninterrupted one), and turn into the JSON records of
``metrics.jsonl`` and back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

__all__ = ["EVENT_KINDS", "Event", "EventKind"]

EventKind = Literal["nan", "spike", "divergence", "plateau", "overfitting", "converged"]

#: Every kind of event, in the order of their urgency.
EVENT_KINDS: tuple[EventKind, ...] = ("nan", "divergence", "spike", "overfitting", "plateau", "converged")


@dataclass(frozen=True)
class Event:
    """One detection.

    Attributes:
        step: the training step the event belongs to (for an evaluation, the step
            it was run at).
        kind: ``"nan"`` (a NaN or infinite value), ``"spike"`` (a sudden jump of
            the loss or the gradient norm), ``"divergence"`` (the loss rose far above
            its minimum and stays there), ``"plateau"`` (no improvement for
            ``patience`` checks), ``"overfitting"`` (evaluation loss rises while the
            training loss falls) or ``"converged"`` (a target loss was reached).
        message: one human-readable sentence that says what was seen and why it
            counts, with the numbers.
        split: ``"train"`` or ``"eval"``: where it was seen.
        metric: the scalar name the event is about, e.g. ``"train/loss"``.
        value: the value of ``metric`` at ``step`` (may be NaN or infinite).
        threshold: the limit the value crossed, when there is one.
    """

    step: int
    kind: EventKind
    message: str
    split: str
    metric: str
    value: float
    threshold: float | None = None

    def to_record(self) -> dict[str, Any]:
        """The JSON record of this event (see ``lmloss.monitor.sinks``)."""
        return {
            "step": self.step,
            "split": self.split,
            "event": self.kind,
            "metric": self.metric,
            "value": self.value,
            "threshold": self.threshold,
            "message": self.message,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Event:
        """Rebuild an event from ``to_record()`` output (e.g. a line of ``metrics.jsonl``)."""
        if not isinstance(record, Mapping):
            raise TypeError(f"an event record must be a mapping, got {type(record).__name__}")
        missing = {"step", "event", "message", "split", "metric", "value"} - set(record)
        if missing:
            raise ValueError(f"event record {dict(record)!r} lacks {sorted(missing)}")
        if record["event"] not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {record['event']!r}; expected one of {EVENT_KINDS}")
        threshold = record.get("threshold")
        return cls(
            step=int(record["step"]),
            kind=cast(EventKind, record["event"]),
            message=str(record["message"]),
            split=str(record["split"]),
            metric=str(record["metric"]),
            value=_as_float(record["value"]),
            threshold=None if threshold is None else _as_float(threshold),
        )

    def __eq__(self, other: object) -> bool:
        # NaN != NaN would make two identical "nan" events unequal.
        if not isinstance(other, Event):
            return NotImplemented
        return self.to_record().keys() == other.to_record().keys() and all(
            _same(a, b) for a, b in zip(self.to_record().values(), other.to_record().values())
        )

    def __hash__(self) -> int:
        return hash((self.step, self.kind, self.metric, self.message))


def _as_float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)
