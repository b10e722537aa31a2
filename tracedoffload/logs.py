"""Logging: structlog events, each carrying the trace and span ids of the token it belongs to (so
a log line leads to its trace in Jaeger or Tempo), delivered through the standard library.

Library code logs with `get_logger(name)`: its events go to `logging.getLogger(name)` under
"tracedoffload", so an application that uses tracedoffload as a library decides where they go
(by default Python prints warnings and errors on stderr and drops the rest; nothing is ever
written to stdout, and importing tracedoffload configures nothing). The command line calls
`configure_logging`, which renders them, and the OpenTelemetry SDK's own log lines, on stderr as
console text or JSON lines.

Processors are plain callables, each doing one thing.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from typing import Any, TextIO

import structlog

from tracedoffload._exceptions import ConfigError

LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


# The token being computed in this context: (trace_id, span_id), set by the tracing core when a
# step begins. A context variable, not a thread-id registry: a thread starts with a context of its
# own, so an exporter's or the telemetry thread's events carry no token, and code that runs the
# model in a copied context (an asyncio task, a server's engine) carries its own.
_CURRENT_TOKEN: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("tracedoffload_current_token", default=None)


def bind_token(trace_id: int, span_id: int) -> None:
    """Mark (trace_id, span_id) as the token being computed in this context."""
    _CURRENT_TOKEN.set((trace_id, span_id))


def unbind_token() -> None:
    _CURRENT_TOKEN.set(None)


def add_token_trace_ids(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Add `trace_id` (32 hex) and `span_id` (16 hex) of the token being computed, when there is one.

    Events emitted on the telemetry thread name their token explicitly and keep their own ids.
    """
    if "trace_id" not in event:
        ids = _CURRENT_TOKEN.get()
        if ids is not None:
            event["trace_id"] = f"{ids[0]:032x}"
            event["span_id"] = f"{ids[1]:016x}"
    return event


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_token_trace_ids,
    ]


def get_logger(name: str) -> Any:
    """A structlog logger whose events go to the standard library's `logging.getLogger(name)`.

    The event dict travels intact to a `configure_logging` formatter; without one (a library
    user's own logging set-up) the record's message is the event dict. Below the logger's level
    no processor runs.
    """
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=[*_shared_processors(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def configure_logging(fmt: str = "console", level: str = "info", stream: TextIO | None = None) -> None:
    """Render every log line of the process on `stream` (stderr by default) as console text or
    JSON lines, at `level` and above: tracedoffload's events, the OpenTelemetry SDK's lines, and
    the application's own structlog and logging events, which carry the token's trace and span
    ids like ours. Process-wide: for the command line, or an application that wants it.

    Raises:
        ConfigError: an unknown format or level.
    """
    if fmt not in LOG_FORMATS:
        raise ConfigError("log_format", fmt, f"one of {list(LOG_FORMATS)}")
    if level not in LOG_LEVELS:
        raise ConfigError("log_level", level, f"one of {list(LOG_LEVELS)}")
    renderer: Any = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    shared = _shared_processors()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # format_exc_info: a traceback as text (the console renderer would otherwise print frame
        # locals, which in an exporter's frames include the OTLP headers, API keys among them).
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.format_exc_info, renderer],
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],  # records not made through structlog
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:  # configured again
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)  # the root's level decides


_HANDLER_NAME = "tracedoffload"
# Loggers whose level follows the root's once configured (a library user may have set theirs).
OWN_LOGGERS = ("tracedoffload", "opentelemetry")


def _fresh_write_locks_in_child() -> None:
    """structlog serialises writes with a lock per stream; one held by another thread at a fork
    would be held for ever in the child (the standard library's logging resets its own)."""
    locks = getattr(getattr(structlog, "_output", None), "WRITE_LOCKS", None)
    if locks is not None:
        locks.clear()  # new locks are made on the next write


os.register_at_fork(after_in_child=_fresh_write_locks_in_child)
