"""The progress bar of `tracedoffload run`, and the one rule that keeps stderr readable beside it:
whatever else is written to stderr first ends the bar's line (`end_progress_line`), as a
command's status line does (`notify`)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any


class ProgressBar:
    """A one-line progress bar on stderr, updated from the telemetry thread; anything else written
    to stderr meanwhile (log lines from any thread) first ends the bar's line: `end_progress_line`."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total = total
        self.width = width
        self.started = time.monotonic()
        self._mid_line = False  # the bar is drawn and the cursor is after it
        self._lock = threading.Lock()  # a redraw and a line break from two threads do not interleave
        _ACTIVE_BARS.append(self)

    def __call__(self, timing: Any, stats: Any) -> None:
        done = min(stats.generated_tokens, self.total)
        filled = self.width * done // self.total
        rate = done / max(1e-9, time.monotonic() - self.started)
        with self._lock:
            print(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} tokens  {rate:.1f} tokens/s", end="", file=sys.stderr, flush=True)
            self._mid_line = True
        if done >= self.total:
            self.break_line()

    def break_line(self) -> None:
        """End the bar's line, so whatever is printed next starts on its own."""
        with self._lock:
            if self._mid_line:
                print(file=sys.stderr, flush=True)
                self._mid_line = False

    def close(self) -> None:
        self.break_line()
        if self in _ACTIVE_BARS:
            _ACTIVE_BARS.remove(self)


_ACTIVE_BARS: list[ProgressBar] = []


def end_progress_line() -> None:
    """Before writing to stderr: end a progress bar's line, if one is drawn."""
    for bar in list(_ACTIVE_BARS):
        bar.break_line()


def notify(message: str) -> None:
    """A status line on stderr ("tracedoffload: loading ..."), on a line of its own."""
    end_progress_line()
    print(f"tracedoffload: {message}", file=sys.stderr, flush=True)
