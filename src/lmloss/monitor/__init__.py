"""Watch the loss: running statistics, event detection, sinks, plots, console.

The last stage of the pipeline (``... -> loss -> reduction -> monitor``)::

    from lmloss.monitor import ConsoleSink, LossMonitor, run_dir_sinks

    monitor = LossMonitor(sinks=run_dir_sinks("runs/exp1") + [ConsoleSink(total_steps=1000)])
    for step in range(1000):
        ...
        for event in monitor.update(step, loss=loss, tokens=n_targets, grad_norm=norm, lr=lr):
            if event.kind == "nan":
                raise RuntimeError(event.message)
    monitor.close()
    # then: lmloss plot runs/exp1   ->  runs/exp1/plots/*.png

Modules: ``monitor`` (``LossMonitor``), ``options`` (its argument checks),
``detectors`` (the rules and their defaults),
``throughput`` (tokens/s, TFLOP/s and MFU),
``events`` (``Event``), ``sinks`` (JSONL/CSV/TensorBoard and the run-directory
format), ``console`` (progress bar), ``plot`` (PNGs and ``lmloss plot``), ``hf``
(``LossMonitorCallback`` for transformers' ``Trainer``, imported on first use).
Nothing here imports matplotlib, rich, tqdm, tensorboard or transformers until it
is used.
"""

from __future__ import annotations

from typing import Any

from lmloss.monitor.console import ConsoleSink
from lmloss.monitor.detectors import (
    AUTO_TRAIN_INTERVAL,
    ConvergedRule,
    DivergenceRule,
    MaxRatioRule,
    OverfittingRule,
    PlateauRule,
    SpikeRule,
)
from lmloss.monitor.events import EVENT_KINDS, Event, EventKind
from lmloss.monitor.monitor import DEVICE_SYNC_EVERY, LossMonitor, MonitorStats
from lmloss.monitor.plot import plot_run
from lmloss.monitor.sinks import (
    CsvSink,
    JsonlSink,
    RunLog,
    Sink,
    SkippedLine,
    TensorBoardSink,
    read_jsonl,
    run_dir_sinks,
)

__all__ = [
    "AUTO_TRAIN_INTERVAL",
    "DEVICE_SYNC_EVERY",
    "EVENT_KINDS",
    "ConsoleSink",
    "ConvergedRule",
    "CsvSink",
    "DivergenceRule",
    "Event",
    "EventKind",
    "JsonlSink",
    "LossMonitor",
    "LossMonitorCallback",
    "MaxRatioRule",
    "MonitorStats",
    "OverfittingRule",
    "PlateauRule",
    "RunLog",
    "Sink",
    "SkippedLine",
    "SpikeRule",
    "TensorBoardSink",
    "plot_run",
    "read_jsonl",
    "run_dir_sinks",
]


def __getattr__(name: str) -> Any:
    # Optional dependencies load on first use, so `import lmloss.monitor` needs torch only.
    if name == "LossMonitorCallback":
        try:
            from lmloss.monitor.hf import LossMonitorCallback
        except ImportError as error:
            raise ImportError("LossMonitorCallback needs transformers: pip install 'lmloss[hf]'") from error
        return LossMonitorCallback
    raise AttributeError(f"module 'lmloss.monitor' has no attribute {name!r}")
