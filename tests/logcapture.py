"""Capturing tracedoffload's log events in a test: they go through the standard library's logging
(see tracedoffload.logs), so a handler on the "tracedoffload" logger collects them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        event = dict(record.msg) if isinstance(record.msg, dict) else {"event": record.getMessage()}
        event.setdefault("log_level", record.levelname.lower())
        self.events.append(event)


@contextlib.contextmanager
def capture_logs() -> Iterator[list[dict[str, Any]]]:
    """The events logged inside the block, every level, as dicts (`event`, `log_level`, fields);
    the same shape as structlog.testing.capture_logs."""
    logger = logging.getLogger("tracedoffload")
    handler, level = _Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.events
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
