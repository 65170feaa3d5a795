"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM.

The first signal only records a request: the training loop finishes the step in
flight, saves a checkpoint and writes its summary, then exits with ``128 + signal``
(130, 143), as a shell reports a process killed by that signal. A second signal
means "now": the default behaviour comes back (``KeyboardInterrupt`` for SIGINT,
termination for SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["STOP_SIGNALS", "StopRequest", "exit_code"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by ``signum`` (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


class StopRequest:
    """Context manager: while active, SIGINT/SIGTERM set :attr:`signum` instead of stopping.

    Only the main thread can install signal handlers; elsewhere (a run started from a
    worker thread) the signals keep their usual behaviour and :attr:`signum` stays ``None``.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            return
        # Asked twice: stop now, the way the signal would have without us.
        self.__exit__(None, None, None)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.raise_signal(signum)
