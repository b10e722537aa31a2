"""structlog set-up: console or JSON lines, each event carrying the trace and span ids of the
token it belongs to (so a log line leads to its trace in Jaeger or Tempo).

Processors are plain callables, each doing one thing; `configure_logging` puts them in order.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

from tracedoffload._exceptions import ConfigError

LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


def add_token_trace_ids(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Add `trace_id` (32 hex) and `span_id` (16 hex) of the token being computed, when there is one.

    Events emitted on the telemetry thread name their token explicitly and keep their own ids.
    """
    if "trace_id" not in event:
        from tracedoffload.tracing.session import current_token_ids

        ids = current_token_ids()
        if ids is not None:
            event["trace_id"] = f"{ids[0]:032x}"
            event["span_id"] = f"{ids[1]:016x}"
    return event


def configure_logging(fmt: str = "console", level: str = "info", stream: TextIO | None = None) -> None:
    """Route every tracedoffload log event through structlog, to `stream` (stderr by default).

    Raises:
        ConfigError: an unknown format or level.
    """
    if fmt not in LOG_FORMATS:
        raise ConfigError("log_format", fmt, f"one of {list(LOG_FORMATS)}")
    if level not in LOG_LEVELS:
        raise ConfigError("log_level", level, f"one of {list(LOG_LEVELS)}")
    renderer: Any = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    shared = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_token_trace_ids,
    ]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_loggers(shared, renderer, level, stream)


# Libraries that log through the standard library (the OpenTelemetry SDK's export retries and
# failures): rendered like our own events, in the same format and stream.
STDLIB_LOGGERS = ("opentelemetry",)


def _route_stdlib_loggers(shared: list[Any], renderer: Any, level: str, stream: TextIO | None) -> None:
    formatter = structlog.stdlib.ProcessorFormatter(
        # format_exc_info: a traceback as text (the console renderer would otherwise print frame
        # locals, which in an exporter's frames include the OTLP headers, API keys among them).
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.format_exc_info, renderer],
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    handler.set_name("tracedoffload")
    for name in STDLIB_LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == "tracedoffload"]:  # configured again
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(getattr(logging, level.upper()))
        logger.propagate = False  # not twice, once here and once by a root handler


def _fresh_write_locks_in_child() -> None:
    """structlog serialises writes with a lock per stream; one held by another thread at a fork
    would be held for ever in the child (the standard library's logging resets its own)."""
    locks = getattr(getattr(structlog, "_output", None), "WRITE_LOCKS", None)
    if locks is not None:
        locks.clear()  # new locks are made on the next write


os.register_at_fork(after_in_child=_fresh_write_locks_in_child)
