"""A tracing session's life in its process: the fork and exit hooks, and a daemon-thread helper.

- Fork: a session's threads do not survive a fork, and a lock held by one of them at the fork
  would be held for ever in the child. Every live session is marked orphaned in the child before
  any of the child's code runs (it then drops and counts its steps; see `TracingSession`).
- Exit: the SDK provider's exit hook lost steps still queued and had no time bound. Here, at
  interpreter exit, every live session drains and flushes side by side within one budget
  (`EXIT_BUDGET_S`), so a stuck exporter neither holds the exit nor costs the others their spans.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any


# Sessions of this process, marked orphaned in a forked child (before any of its code runs).
_LIVE_SESSIONS: weakref.WeakSet[Any] = weakref.WeakSet()


def register(session: Any) -> None:
    """Track `session` (anything with `_after_fork_in_child()` and `shutdown(timeout_s)`) for
    the fork and exit hooks; it is forgotten when garbage-collected."""
    _LIVE_SESSIONS.add(session)


def _orphan_sessions_in_child() -> None:
    for session in list(_LIVE_SESSIONS):
        session._after_fork_in_child()


EXIT_BUDGET_S = 5.0


def _shut_sessions_down_at_exit() -> None:
    """Send what live sessions still hold, side by side (a stuck exporter must not use up the
    others' time) and all within one budget."""
    deadline = time.monotonic() + EXIT_BUDGET_S
    closers = [start_daemon(_shut_down_quietly, session, deadline) for session in list(_LIVE_SESSIONS)]
    for closer in closers:
        if closer is not None:
            closer.join(max(0.0, deadline - time.monotonic()))


def _shut_down_quietly(session: Any, deadline: float) -> None:
    try:
        session.shutdown(max(0.05, deadline - time.monotonic()))
    except Exception:  # noqa: BLE001 - one session's failure must not cost the others theirs
        pass


def start_daemon(target: Callable[..., None], *args: Any) -> threading.Thread | None:
    """`target(*args)` on a daemon thread, which is returned; where no thread can start (at
    interpreter exit on Python 3.12.0-3.12.1) it runs here and None is returned."""
    thread = threading.Thread(target=target, args=args, name="tracedoffload-shutdown", daemon=True)
    try:
        thread.start()
    except RuntimeError:
        target(*args)
        return None
    return thread


os.register_at_fork(after_in_child=_orphan_sessions_in_child)
atexit.register(_shut_sessions_down_at_exit)
