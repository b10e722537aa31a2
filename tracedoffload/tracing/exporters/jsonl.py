"""OTLP/JSON lines: a span exporter writing the OTLP File Exporter format, and its reader.

Each `export()` call appends one line holding one `ExportTraceServiceRequest` in OTLP/JSON
(https://opentelemetry.io/docs/specs/otel/protocol/file-exporter/): lowerCamelCase field names,
trace and span ids as lowercase hex, 64-bit integers as decimal strings, enums as integers. The
OpenTelemetry Collector's `file` exporter (JSON format) writes the same schema, so
`read_otlp_jsonl` reads both.

The encoder goes straight from `ReadableSpan` to JSON text: it runs on the export thread of a
process that is generating tokens, where the protobuf route (`encode_spans` + `MessageToDict`)
costs about ten times as much per span.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from json.encoder import encode_basestring_ascii as _quote  # C-accelerated
from pathlib import Path
from typing import Any

import structlog
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from tracedoffload.tracing.spanview import SpanView

log = structlog.get_logger("tracedoffload.tracing.exporters.jsonl")

__all__ = ["OtlpJsonLinesExporter", "encode_otlp_json", "read_otlp_jsonl"]

# OTLP's SpanKind enum is the SDK's shifted by one (0 is SPAN_KIND_UNSPECIFIED).
_KIND = {kind: kind.value + 1 for kind in SpanKind}
# SpanFlags bits 8 (context has is_remote) and 9 (is_remote), set as the SDK's protobuf encoder sets them.
_FLAGS_LOCAL = 0x100
_FLAGS_REMOTE = 0x300


# -- encoding ---------------------------------------------------------------------------------------
#
# The encoder writes JSON text directly. Building dicts for `json.dumps` cost about 2.6 times as
# much per span (each attribute is two small dicts to build and then to walk), and the protobuf
# route (`encode_spans` + `MessageToDict`) about 10 times. Every string from the span goes
# through json's C escaper, ASCII-only, so the output is valid JSON whatever the span holds.

_KEY_PREFIX: dict[str, str] = {}  # attribute key -> '{"key":"<key>","value":'; keys are few and constant
_KEY_PREFIX_LIMIT = 4096


def _key_prefix(key: str) -> str:
    prefix = _KEY_PREFIX.get(key)
    if prefix is None:
        prefix = '{"key":' + _quote(str(key)) + ',"value":'
        if len(_KEY_PREFIX) < _KEY_PREFIX_LIMIT:
            _KEY_PREFIX[key] = prefix
    return prefix


def _value(value: Any) -> str:
    """An attribute value as OTLP/JSON `AnyValue` text."""
    # Exact type checks first: they are the common case, and bool must not pass as int.
    kind = type(value)
    if kind is str:
        return '{"stringValue":' + _quote(value) + "}"
    if kind is int:
        return '{"intValue":"' + str(value) + '"}'
    if kind is float:
        if value - value == 0.0:  # finite: repr is what json.dumps writes
            return '{"doubleValue":' + repr(value) + "}"
        # proto3 JSON spells the non-finite doubles as strings
        return '{"doubleValue":"' + ("NaN" if value != value else "Infinity" if value > 0 else "-Infinity") + '"}'
    if kind is bool:
        return '{"boolValue":true}' if value else '{"boolValue":false}'
    if kind is tuple or kind is list:
        return '{"arrayValue":{"values":[' + ",".join([_value(v) for v in value]) + "]}}"
    return _value_slow(value)


def _value_slow(value: Any) -> str:
    if value is None:
        return "{}"
    if isinstance(value, bool):
        return _value(bool(value))
    if isinstance(value, str):
        return _value(str(value))
    if isinstance(value, int):
        return _value(int(value))
    if isinstance(value, float):
        return _value(float(value))
    if isinstance(value, (bytes, bytearray)):
        return '{"bytesValue":"' + base64.b64encode(value).decode("ascii") + '"}'
    if isinstance(value, Mapping):
        return '{"kvlistValue":{"values":[' + _attributes(value) + "]}}"
    if isinstance(value, Sequence):
        return '{"arrayValue":{"values":[' + ",".join([_value(v) for v in value]) + "]}}"
    return _value(str(value))  # the SDK's encoder drops such values; a string keeps the information


def _items(attributes: Mapping[str, Any]) -> Any:
    # span.attributes is a MappingProxyType over BoundedAttributes, whose generic items() view
    # runs in Python; copy() hands back the plain dict underneath and iterates in C.
    try:
        return attributes.copy().items()  # type: ignore[attr-defined]
    except AttributeError:
        return attributes.items()


def _attributes(attributes: Mapping[str, Any]) -> str:
    # _value and _key_prefix inlined for the common types: this loop is most of the encoder's time.
    prefixes = _KEY_PREFIX
    out = []
    for key, value in _items(attributes):
        prefix = prefixes.get(key) or _key_prefix(key)
        kind = type(value)
        if kind is str:
            out.append(prefix + '{"stringValue":' + _quote(value) + "}}")
        elif kind is int:
            out.append(prefix + '{"intValue":"' + str(value) + '"}}')
        elif kind is bool:
            out.append(prefix + ('{"boolValue":true}}' if value else '{"boolValue":false}}'))
        elif (kind is list or kind is tuple) and all(type(v) is int for v in value):
            # Integer arrays (the token span's per-layer figures): one join instead of a call per value.
            out.append(prefix + '{"arrayValue":{"values":[' + ",".join(['{"intValue":"%d"}' % v for v in value]) + "]}}}")
        else:
            out.append(prefix + _value(value) + "}")
    return ",".join(out)


def _trace_state(trace_state: Any) -> str:
    return _quote(",".join(f"{key}={value}" for key, value in trace_state.items()))


def _span(span: ReadableSpan) -> str:
    context = span.context
    trace_state = f',"traceState":{_trace_state(context.trace_state)}' if context.trace_state else ""
    parent = span.parent
    if parent is None:
        parent_flags = f',"flags":{_FLAGS_LOCAL}'
    else:
        flags = _FLAGS_REMOTE if parent.is_remote else _FLAGS_LOCAL
        parent_flags = f',"parentSpanId":"{parent.span_id:016x}","flags":{flags}'
    attributes = span.attributes
    if attributes:
        attrs = ',"attributes":[' + _attributes(attributes) + "]"
        if dropped := span.dropped_attributes:
            attrs += f',"droppedAttributesCount":{dropped}'
    else:
        attrs = ""
    events = span.events
    if events:
        evs = ',"events":[' + ",".join([_event(event) for event in events]) + "]"
        if dropped := span.dropped_events:
            evs += f',"droppedEventsCount":{dropped}'
    else:
        evs = ""
    links = span.links
    if links:
        lns = ',"links":[' + ",".join([_link(link) for link in links]) + "]"
        if dropped := span.dropped_links:
            lns += f',"droppedLinksCount":{dropped}'
    else:
        lns = ""
    # status is always present, as the SDK's protobuf encoder sets it; code 0 (UNSET) is the default.
    status = span.status
    code = status.status_code.value if status is not None else 0
    message = status.description if status is not None else None
    if code or message:
        parts = ([f'"code":{code}'] if code else []) + ([f'"message":{_quote(message)}'] if message else [])
        status_json = "{" + ",".join(parts) + "}"
    else:
        status_json = "{}"
    return (
        f'{{"traceId":"{context.trace_id:032x}","spanId":"{context.span_id:016x}"{trace_state}{parent_flags},'
        f'"name":{_quote(span.name)},"kind":{_KIND[span.kind]},'
        f'"startTimeUnixNano":"{span.start_time or 0}","endTimeUnixNano":"{span.end_time or 0}"'
        f'{attrs}{evs}{lns},"status":{status_json}}}'
    )


def _event(event: Any) -> str:
    text = f'{{"timeUnixNano":"{event.timestamp}","name":{_quote(event.name)}'
    if event.attributes:
        text += ',"attributes":[' + _attributes(event.attributes) + "]"
        if dropped := event.dropped_attributes:
            text += f',"droppedAttributesCount":{dropped}'
    return text + "}"


def _link(link: Any) -> str:
    context = link.context
    text = f'{{"traceId":"{context.trace_id:032x}","spanId":"{context.span_id:016x}"'
    if context.trace_state:
        text += f',"traceState":{_trace_state(context.trace_state)}'
    if link.attributes:
        text += ',"attributes":[' + _attributes(link.attributes) + "]"
        if dropped := link.dropped_attributes:
            text += f',"droppedAttributesCount":{dropped}'
    return text + f',"flags":{_FLAGS_REMOTE if context.is_remote else _FLAGS_LOCAL}}}'


def _resource(resource: Any) -> str:
    attributes = resource.attributes if resource is not None else None
    return '{"attributes":[' + _attributes(attributes) + "]}" if attributes else "{}"


def _scope(scope: Any) -> str:
    if scope is None:
        return "{}"
    text = '{"name":' + _quote(scope.name or "")
    if scope.version:
        text += ',"version":' + _quote(scope.version)
    if scope.attributes:
        text += ',"attributes":[' + _attributes(scope.attributes) + "]"
    return text + "}"


# Resources and scopes are immutable and shared by every span of a provider: encode each once.
# Keyed by id() with the object kept in the value, so an id cannot be reused while cached.
_resource_cache: dict[int, tuple[Any, str]] = {}
_scope_cache: dict[int, tuple[Any, str]] = {}
_CACHE_LIMIT = 64


def _cached(cache: dict[int, tuple[Any, str]], obj: Any, encode: Any) -> str:
    hit = cache.get(id(obj))
    if hit is not None and hit[0] is obj:
        return hit[1]
    encoded = encode(obj)
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[id(obj)] = (obj, encoded)
    return encoded


def encode_otlp_json(spans: Sequence[ReadableSpan]) -> str:
    """Encode spans as one OTLP/JSON `ExportTraceServiceRequest`, as one line of ASCII JSON text.

    Spans are grouped by resource, then by instrumentation scope, in first-seen order, as the
    SDK's protobuf encoder (`encode_spans`) groups them; every field it sets is written, with ids
    as hex as OTLP/JSON requires. Thread-safe.

    Args:
        spans: Finished spans.

    Returns:
        `{"resourceSpans":[...]}` without a trailing newline.
    """
    # Resources are found by identity first: Resource.__hash__ serialises its attributes to JSON.
    # Equal resources (and equal scopes) still share a group, as in the SDK's encoder. The spans
    # hold their resources alive for the whole call, so ids cannot be reused meanwhile.
    groups: list[tuple[Any, dict[Any, list[str]]]] = []
    by_id: dict[int, tuple[Any, dict[Any, list[str]]]] = {}
    last_resource: Any = groups  # a sentinel no span carries
    last_scope: Any = groups
    bucket: list[str] = []
    for span in spans:
        resource = span.resource
        scope = span.instrumentation_scope
        if resource is not last_resource or scope is not last_scope:
            group = by_id.get(id(resource))
            if group is None:
                group = next((g for g in groups if g[0] == resource), None)
                if group is None:
                    group = (resource, {})
                    groups.append(group)
                by_id[id(resource)] = group
            bucket = group[1].setdefault(scope, [])
            last_resource, last_scope = resource, scope
        bucket.append(_span(span))
    resource_spans = []
    for resource, scopes in groups:
        scope_spans = []
        for scope, encoded_spans in scopes.items():
            schema = f',"schemaUrl":{_quote(scope.schema_url)}' if scope is not None and scope.schema_url else ""
            scope_json = _cached(_scope_cache, scope, _scope)
            scope_spans.append('{"scope":' + scope_json + ',"spans":[' + ",".join(encoded_spans) + "]" + schema + "}")
        schema = (
            f',"schemaUrl":{_quote(resource.schema_url)}' if resource is not None and resource.schema_url else ""
        )
        resource_json = _cached(_resource_cache, resource, _resource)
        resource_spans.append(
            '{"resource":' + resource_json + ',"scopeSpans":[' + ",".join(scope_spans) + "]" + schema + "}"
        )
    return '{"resourceSpans":[' + ",".join(resource_spans) + "]}"


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


def _id(text: str | None, size: int) -> int:
    """A trace (16 bytes) or span (8 bytes) id: lowercase hex per OTLP/JSON, or protobuf's base64."""
    if not text:
        return 0
    if len(text) == 2 * size:
        return int(text, 16)
    return int.from_bytes(base64.b64decode(text), "big")


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
        return base64.b64decode(value["bytesValue"])
    return None


def _python_attributes(key_values: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {kv["key"]: _python_value(kv.get("value") or {}) for kv in key_values}


def _views(request: Mapping[str, Any]) -> Iterator[SpanView]:
    for resource_spans in request.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                parent = _id(span.get("parentSpanId"), 8)
                yield SpanView(
                    name=span.get("name", ""),
                    trace_id=_id(span.get("traceId"), 16),
                    span_id=_id(span.get("spanId"), 8),
                    parent_span_id=parent or None,
                    start_ns=int(span.get("startTimeUnixNano", 0)),
                    end_ns=int(span.get("endTimeUnixNano", 0)),
                    attributes=_python_attributes(span.get("attributes", ())),
                    links=tuple(
                        (_id(link.get("traceId"), 16), _id(link.get("spanId"), 8)) for link in span.get("links", ())
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
                raise ValueError(f"{path}:{number}: not an OTLP/JSON ExportTraceServiceRequest: {exc!r}") from exc
            yield from views
