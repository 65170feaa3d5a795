"""``ConsoleSink``: a progress bar (step, loss, ppl, tokens/s, ETA) and event messages.

A sink like the others: give it to ``LossMonitor(sinks=[...])``. It draws with rich
when installed (``pip install 'lmloss[plot]'``), else tqdm, else plain lines, and
prints every event above the bar as it is detected.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import IO, Any

__all__ = ["ConsoleSink"]

BACKENDS = ("auto", "rich", "tqdm", "plain")
_STYLE = {
    "nan": "bold red",
    "divergence": "bold red",
    "spike": "yellow",
    "overfitting": "magenta",
    "plateau": "cyan",
    "converged": "green",
}


class ConsoleSink:
    """Progress bar and event messages on a terminal.

    Args:
        total_steps: the last step of the run, for the bar and the ETA (``None``:
            no ETA).
        backend: ``"rich"``, ``"tqdm"``, ``"plain"`` (one line per ``every`` steps), or
            ``"auto"`` (the first of those that is installed).
        every: with ``"plain"``, print a line every this many steps.
        file: where to draw (default ``sys.stderr``, like tqdm).
    """

    def __init__(
        self, total_steps: int | None = None, *, backend: str = "auto", every: int = 50, file: IO[str] | None = None
    ) -> None:
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)):
            raise TypeError(f"total_steps must be None or an int, got {total_steps!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not supported; use one of {', '.join(map(repr, BACKENDS))}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.total_steps = total_steps
        self.backend = _pick(backend)
        self.every = every
        self.file = file
        self._bar: Any = None
        self._task: Any = None
        self._last_eval = ""

    def write(self, record: Mapping[str, Any]) -> None:
        if "event" in record:
            self._print_event(record)
        elif record.get("split") == "eval":
            self._last_eval = f"eval {record['eval/loss']:.4f}"
        elif record.get("split") == "train":
            self._advance(int(record["step"]), describe(record, self._last_eval))

    def close(self) -> None:
        if self._bar is not None:
            if self.backend == "rich":
                self._bar.stop()
            else:
                self._bar.close()
            self._bar = None

    # --- backends -----------------------------------------------------------------

    def _advance(self, step: int, text: str) -> None:
        if self.backend == "plain":
            if step % self.every == 0 or step == self.total_steps:
                total = f"/{self.total_steps}" if self.total_steps is not None else ""
                print(f"step {step}{total}  {text}", file=self.file or sys.stderr, flush=True)
            return
        if self._bar is None:
            self._start()
        if self.backend == "rich":
            self._bar.update(self._task, completed=step, metrics=text)
        else:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(text, refresh=True)

    def _start(self) -> None:
        if self.backend == "rich":
            self._bar, self._task = _rich_progress(self.total_steps, self.file)
        else:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total_steps, unit="step", file=self.file or sys.stderr, dynamic_ncols=True)

    def _print_event(self, record: Mapping[str, Any]) -> None:
        kind, message = str(record["event"]), str(record["message"])
        if self.backend == "rich":
            from rich.markup import escape

            if self._bar is None:
                self._start()
            style = _STYLE.get(kind, "bold")
            self._bar.console.print(f"[{style}]{kind:>11}[/] {escape(message)}")
        elif self.backend == "tqdm":
            from tqdm.auto import tqdm

            tqdm.write(f"[{kind}] {message}", file=self.file or sys.stderr)
        else:
            print(f"[{kind}] {message}", file=self.file or sys.stderr, flush=True)


def describe(record: Mapping[str, Any], extra: str = "") -> str:
    """``loss 2.3140 · ppl 10.12 · 18.2k tok/s`` for a train record (what is known)."""
    parts = []
    loss = record.get("train/loss")
    if isinstance(loss, (int, float)):
        parts.append(f"loss {loss:.4f}")
        smoothed = record.get("train/loss_smoothed")
        if isinstance(smoothed, (int, float)):  # the smoothed ppl: the raw one jumps around
            parts.append(f"ppl {math.exp(min(smoothed, 700.0)):.4g}")
    rate = record.get("throughput/tokens_per_s")
    if isinstance(rate, (int, float)):
        parts.append(f"{_si(rate)} tok/s")
    if extra:
        parts.append(extra)
    return " · ".join(parts)


def _si(x: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.1f}{suffix}"
    return f"{x:.0f}"


def _pick(backend: str) -> str:
    if backend != "auto":
        _require(backend)
        return backend
    for candidate in ("rich", "tqdm"):
        try:
            _require(candidate)
            return candidate
        except ImportError:
            continue
    return "plain"


def _require(backend: str) -> None:
    if backend == "rich":
        try:
            import rich  # noqa: F401  (imported only to see whether it is installed)
        except ImportError as error:
            raise ImportError("the rich console needs rich: pip install 'lmloss[plot]'") from error
    elif backend == "tqdm":
        try:
            import tqdm  # noqa: F401  (imported only to see whether it is installed)
        except ImportError as error:
            raise ImportError("the tqdm console needs tqdm: pip install tqdm") from error


def _rich_progress(total: int | None, file: IO[str] | None) -> tuple[Any, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Column

    console = Console(file=file or sys.stderr)
    progress = Progress(
        TextColumn("[bold]step"),
        MofNCompleteColumn(),
        BarColumn(bar_width=24),
        TextColumn("eta"),
        TimeRemainingColumn(),
        # The metrics get what is left (about 56 columns go to the rest): a narrow terminal
        # cuts them short with an ellipsis, never the step or the ETA, and never wraps.
        TextColumn(
            "{task.fields[metrics]}",
            table_column=Column(no_wrap=True, overflow="ellipsis", max_width=max(console.width - 56, 8)),
        ),
        console=console,
        transient=False,
    )
    progress.start()
    task = progress.add_task("train", total=total, metrics="")
    return progress, task
