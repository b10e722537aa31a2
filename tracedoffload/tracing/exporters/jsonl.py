"""OTLP/JSON lines: a span exporter writing the OTLP File Exporter format, and its reader.

Each `export()` call appends one line holding one `ExportTraceServiceRequest` in OTLP/JSON
(https://opentelemetry.io/docs/specs/otel/protocol/file-exporter/), encoded by
`tracedoffload.tracing.exporters.otlp_json`. The OpenTelemetry Collector's `file` exporter (JSON
format) writes the same schema, so `read_otlp_jsonl` reads both.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracedoffload.logs import get_logger
from tracedoffload.tracing.exporters.otlp_json import encode_otlp_json
from tracedoffload.tracing.spanview import SpanView

log = get_logger("tracedoffload.tracing.exporters.jsonl")

__all__ = ["OtlpJsonLinesExporter", "encode_otlp_json", "read_otlp_jsonl"]


# -- the exporter ------------------------------------------------------------------------------------


class OtlpJsonLinesExporter(SpanExporter):
    """Appends each batch of spans to a file as one OTLP/JSON line (the OTLP File Exporter format).

    Thread safety: `export` may be called from several threads; encoding runs outside the lock and
    each line is written with a single unbuffered write under it, so lines never interleave.
    Blocking: `export` blocks on one file write. It never raises: a failed write returns
    `SpanExportResult.FAILURE` and is logged (once per run of failures, with the count so far).

    Example:
        >>> provider.add_span_processor(BatchSpanProcessor(OtlpJsonLinesExporter("trace.jsonl")))

    Args:
        path: File to write; parent directories are created.
        append: Keep existing content (the default) or truncate the file.

    Raises:
        OSError: The file cannot be opened.
    """

    def __init__(self, path: str | os.PathLike[str], *, append: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: one write() per line, so each export reaches the OS before it returns and
        # nothing half-written lingers in a user-space buffer after a failed write.
        self._file = open(self.path, "ab" if append else "wb", buffering=0)  # noqa: SIM115
        self._lock = threading.Lock()
        self._closed = False
        self._torn = False  # the last write stopped mid-line: start the next on a fresh line
        self._failures = 0
        self._failing = False

    @property
    def failures(self) -> int:
        """Number of `export` calls whose write failed."""
        return self._failures

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Write `spans` as one line. Never raises; returns FAILURE when the write fails or after shutdown."""
        if self._closed:
            return SpanExportResult.FAILURE
        if not spans:
            return SpanExportResult.SUCCESS
        try:
            data = (encode_otlp_json(spans) + "\n").encode("ascii")
        except Exception as exc:  # a value json cannot encode: telemetry must not raise into the caller
            log.error("otlp_jsonl.encode_failed", path=str(self.path), error=repr(exc), spans=len(spans))
            return SpanExportResult.FAILURE
        with self._lock:
            if self._closed:
                return SpanExportResult.FAILURE
            if self._torn:
                data = b"\n" + data
            view = memoryview(data)
            written = 0
            try:
                while written < len(view):
                    written += self._file.write(view[written:]) or 0
            except OSError as exc:
                self._torn = written > 0 or self._torn
                self._failures += 1
                if not self._failing:
                    self._failing = True
                    log.error("otlp_jsonl.write_failed", path=str(self.path), error=repr(exc), failures=self._failures)
                return SpanExportResult.FAILURE
            self._torn = False
            if self._failing:
                self._failing = False
                log.info("otlp_jsonl.write_recovered", path=str(self.path), failures=self._failures)
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Every line is already handed to the OS when `export` returns: nothing to do."""
        return True

    def shutdown(self) -> None:
        """Close the file; later exports return FAILURE. Idempotent, never raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._file.close()
            except OSError as exc:
                log.error("otlp_jsonl.close_failed", path=str(self.path), error=repr(exc))


# -- reading ------------------------------------------------------------------------------------------


def _id(text: str | None, size: int, field: str) -> int:
    """A trace (16 bytes) or span (8 bytes) id: lowercase hex per OTLP/JSON, or protobuf's base64."""
    if not text:
        return 0
    try:
        if len(text) == 2 * size:
            return int(text, 16)
        return int.from_bytes(base64.b64decode(text, validate=True), "big")
    except (ValueError, TypeError):
        raise ValueError(f"{field} {text!r} is neither {2 * size} hex digits nor base64") from None


def _python_value(value: Mapping[str, Any]) -> Any:
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])  # also parses "NaN", "Infinity", "-Infinity"
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return tuple(_python_value(v) for v in value["arrayValue"].get("values", ()))
    if "kvlistValue" in value:
        return _python_attributes(value["kvlistValue"].get("values", ()))
    if "bytesValue" in value:
        return base64.b64decode(value["bytesValue"], validate=True)
    return None


def _python_attributes(key_values: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    attributes = {}
    for kv in key_values:
        try:
            attributes[kv["key"]] = _python_value(kv.get("value") or {})
        except (ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"attribute {kv['key']!r} has a malformed value {kv.get('value')!r} ({error})") from None
    return attributes


def _views(request: Mapping[str, Any]) -> Iterator[SpanView]:
    for resource_spans in request.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                parent = _id(span.get("parentSpanId"), 8, "parentSpanId")
                yield SpanView(
                    name=span.get("name", ""),
                    trace_id=_id(span.get("traceId"), 16, "traceId"),
                    span_id=_id(span.get("spanId"), 8, "spanId"),
                    parent_span_id=parent or None,
                    start_ns=int(span.get("startTimeUnixNano", 0)),
                    end_ns=int(span.get("endTimeUnixNano", 0)),
                    attributes=_python_attributes(span.get("attributes", ())),
                    links=tuple(
                        (_id(link.get("traceId"), 16, "link traceId"), _id(link.get("spanId"), 8, "link spanId")) for link in span.get("links", ())
                    ),
                )


def read_otlp_jsonl(path: str | os.PathLike[str]) -> Iterator[SpanView]:
    """Read spans back from an OTLP/JSON lines file.

    Reads files from `OtlpJsonLinesExporter` and from the OpenTelemetry Collector's `file` exporter
    in JSON format. Ids become ints (hex, or protobuf's base64), times int nanoseconds, attribute
    values Python values (`intValue` strings -> int, arrays -> tuples, key-value lists -> dicts),
    links `(trace_id, span_id)` tuples. Blank lines are skipped. The file is read lazily.

    Example:
        >>> slow = [s for s in read_otlp_jsonl("trace.jsonl") if s.duration_ns > 5_000_000]

    Args:
        path: The file.

    Yields:
        One `SpanView` per span, in file order.

    Raises:
        OSError: The file cannot be read.
        ValueError: A line is not an OTLP/JSON request; the message names the file and line.
    """
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                views = list(_views(request))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise ValueError(f"{path}:{number}: not an OTLP/JSON ExportTraceServiceRequest: {exc}") from exc
            yield from views
