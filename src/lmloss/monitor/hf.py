"""``LossMonitorCallback``: a ``LossMonitor`` inside transformers' ``Trainer``.

This module imports transformers; ``lmloss.monitor`` loads it only when
``LossMonitorCallback`` is first used::

    from lmloss.monitor import LossMonitorCallback
    trainer = Trainer(..., callbacks=[LossMonitorCallback(run_dir="runs/exp1", stop_on=("nan",))])

What it feeds: every ``Trainer.log`` with a ``loss`` (the loss averaged over the
logging interval, already gathered over processes by the Trainer) becomes
``update(global_step, loss=.., grad_norm=.., lr=..)``; with
``include_num_input_tokens_seen`` on, the input tokens since the last log give
tokens/s (input tokens, not target tokens). Every log with ``eval_loss`` becomes
``update_eval``. The Trainer has already combined the processes, so the monitor runs
without a process group, and only the main process writes files and plots.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lmloss.monitor.console import ConsoleSink
from lmloss.monitor.events import EVENT_KINDS, Event
from lmloss.monitor.monitor import LossMonitor
from lmloss.monitor.sinks import run_dir_sinks

__all__ = ["LossMonitorCallback"]


class LossMonitorCallback(TrainerCallback):
    """Watches a ``Trainer``'s logged losses; writes the run directory and its plots.

    Args:
        monitor: the monitor to feed; by default one is built at ``on_train_begin``
            with the sinks of ``run_dir`` (and a console bar if ``console``).
        run_dir: where ``metrics.jsonl`` and ``plots/`` go (default: the Trainer's
            ``output_dir``).
        plot: write the PNGs at the end of training.
        stop_on: event kinds that stop training (``control.should_training_stop``),
            e.g. ``("nan", "divergence")``; nothing stops by default.
        console: add a ``ConsoleSink`` progress bar (the Trainer has its own bar;
            disable it with ``disable_tqdm=True``).
    """

    def __init__(
        self,
        monitor: LossMonitor | None = None,
        *,
        run_dir: str | os.PathLike[str] | None = None,
        plot: bool = True,
        stop_on: Iterable[str] = (),
        console: bool = False,
    ) -> None:
        if monitor is not None and not isinstance(monitor, LossMonitor):
            raise TypeError(f"monitor must be a LossMonitor or None, got {type(monitor).__name__}")
        stop_on = tuple(stop_on)
        unknown = [kind for kind in stop_on if kind not in EVENT_KINDS]
        if unknown:
            raise ValueError(f"stop_on has unknown event kind(s) {unknown}; choose among {EVENT_KINDS}")
        self.monitor = monitor
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.plot = plot
        self.stop_on = stop_on
        self.console = console
        self.events: list[Event] = []
        self._last_step = -1
        self._last_tokens: float | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.run_dir is None:
            if not args.output_dir:
                raise ValueError("LossMonitorCallback needs run_dir= when the Trainer has no output_dir")
            self.run_dir = Path(args.output_dir)
        if self.monitor is None:
            sinks = run_dir_sinks(self.run_dir)
            if self.console:
                sinks.append(ConsoleSink(total_steps=state.max_steps or None))
            self.monitor = LossMonitor(sinks=sinks, write_sinks=state.is_world_process_zero)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        if self.monitor is None or not logs:
            return control
        step, events = state.global_step, []
        # A resumed Trainer may log a step again: the monitor wants increasing steps.
        if "loss" in logs and step > self._last_step:
            self._last_step = step
            events += self.monitor.update(
                step,
                loss=logs["loss"],
                grad_norm=logs.get("grad_norm"),
                lr=logs.get("learning_rate"),
                tokens=self._new_tokens(logs),
            )
        if "eval_loss" in logs:
            last_eval = self.monitor.stats.eval_step
            if last_eval is None or step > last_eval:
                events += self.monitor.update_eval(step, loss=logs["eval_loss"])
        self.events += events
        if any(event.kind in self.stop_on for event in events):
            control.should_training_stop = True
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.monitor is None:
            return
        self.events += self.monitor.flush()
        self.monitor.close()
        if self.plot and state.is_world_process_zero and self.run_dir is not None:
            from lmloss.monitor.plot import plot_run

            plot_run(self.run_dir)

    def _new_tokens(self, logs: dict[str, Any]) -> float | None:
        seen = logs.get("num_input_tokens_seen")
        if seen is None:
            return None
        previous, self._last_tokens = self._last_tokens, float(seen)
        return None if previous is None else max(float(seen) - previous, 0.0)
