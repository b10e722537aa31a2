"""Chrome trace-event JSON, for a look at one run in ui.perfetto.dev (or chrome://tracing).

Spans are buffered in memory and written as complete events (`"ph": "X"`) on named tracks of one
process, `tracedoffload`: the generation spans, steps, layer transfers, layer computes and layer
releases each get a track of their own, so the copy stream's work lines up under the compute it
feeds. Times are microseconds relative to the earliest span (the absolute origin is kept in
`otherData.origin_unix_ns`): an absolute epoch in float microseconds would only resolve a quarter
of a microsecond, coarser than a small layer's release.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracedoffload._checks import check_int
from tracedoffload.logs import get_logger
from tracedoffload.names import (
    GEN_AI_OPERATION,
    GEN_AI_OPERATION_NAME,
    SPAN_COMPUTE,
    SPAN_DRAFT,
    SPAN_RELEASE,
    SPAN_STEP,
    SPAN_TRANSFER,
)

log = get_logger("tracedoffload.tracing.exporters.perfetto")

__all__ = ["PROCESS_NAME", "TRACKS", "PerfettoExporter", "track_of"]

PROCESS_NAME = "tracedoffload"
# Track names in display order; a track's thread id is its position plus one.
TRACKS = ("generation", "steps", "drafts", "transfers", "compute", "releases", "other")
_TRACK_BY_SPAN = {SPAN_STEP: "steps", SPAN_TRANSFER: "transfers", SPAN_COMPUTE: "compute", SPAN_RELEASE: "releases", SPAN_DRAFT: "drafts"}
_OPTIONAL_TRACKS = ("drafts", "other")  # named only when a span is on them
_TID = {track: index + 1 for index, track in enumerate(TRACKS)}
_PID = 1
_WRITE_CHUNK = 10_000  # events encoded per write, so a large trace never sits in memory as one string

# name, start_ns, end_ns, trace_id, span_id, parent_span_id (or None), attributes
_Record = tuple[str, int, int, int, int, "int | None", Mapping[str, Any]]


def track_of(name: str, attributes: Mapping[str, Any]) -> str:
    """The track a span goes on: one of `TRACKS`, from its name (the generation span also by attribute)."""
    track = _TRACK_BY_SPAN.get(name)
    if track is not None:
        return track
    if name == GEN_AI_OPERATION or name.startswith(GEN_AI_OPERATION + " ") or GEN_AI_OPERATION_NAME in attributes:
        return "generation"
    return "other"


def _plain(attributes: Mapping[str, Any]) -> dict[str, Any]:
    # A plain dict, so the span and its BoundedAttributes (which carries a lock) can be freed.
    try:
        return attributes.copy()  # type: ignore[attr-defined, no-any-return]
    except AttributeError:
        return dict(attributes)


def _record(span: ReadableSpan) -> _Record:
    context = span.context
    parent = span.parent
    return (
        span.name,
        span.start_time or 0,
        span.end_time or 0,
        context.trace_id,
        context.span_id,
        parent.span_id if parent is not None else None,
        _plain(span.attributes),
    )


def _arg(value: Any) -> Any:
    """An attribute value as strict JSON: no NaN or infinities, no bytes."""
    if isinstance(value, float) and value - value != 0.0:
        return repr(value)
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, (tuple, list)):
        return [_arg(v) for v in value]
    if value is None or isinstance(value, (str, int, float)):
        return value
    return str(value)


class PerfettoExporter(SpanExporter):
    """Buffers spans and writes them as a Chrome trace-event JSON file on flush and shutdown.

    Each `force_flush` and `shutdown` rewrites the whole file with every span so far, through a
    temporary file and a rename, so the file on disk is always a complete trace. At most
    `max_spans` spans are kept; later ones are dropped and counted in `dropped_spans`.

    Thread safety: all methods may be called from any thread. Blocking: `export` only appends to
    the buffer; `force_flush` and `shutdown` sort and write the buffer (seconds for a million
    spans). Nothing raises: a failed write is logged and `force_flush` returns False.

    Example:
        >>> exporter = PerfettoExporter("trace.json")
        >>> provider.add_span_processor(BatchSpanProcessor(exporter))
        >>> ...; provider.shutdown()  # writes trace.json: open it in ui.perfetto.dev

    Args:
        path: The JSON file; parent directories are created.
        max_spans: Buffer cap, in spans.

    Raises:
        ConfigError: `max_spans` is not a positive integer.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_spans: int = 1_000_000) -> None:
        check_int("max_spans", max_spans, 1, meaning="spans kept in memory until written")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_spans = max_spans
        self._records: list[_Record] = []
        self._dropped = 0
        self._lock = threading.Lock()  # guards the buffer and the counters
        self._write_lock = threading.Lock()  # one writer of the temporary file at a time
        self._shutdown = False

    @property
    def dropped_spans(self) -> int:
        """Spans dropped because the buffer was full."""
        return self._dropped

    @property
    def buffered_spans(self) -> int:
        """Spans held for the next write."""
        return len(self._records)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Buffer `spans`. Never raises; FAILURE only after shutdown. Spans over the cap are counted, not kept."""
        if self._shutdown:
            return SpanExportResult.FAILURE
        try:
            records = [_record(span) for span in spans]
        except Exception as exc:  # a malformed span must not raise into the export thread
            log.error("perfetto.export_failed", path=str(self.path), error=repr(exc), spans=len(spans))
            return SpanExportResult.FAILURE
        with self._lock:
            if self._shutdown:
                return SpanExportResult.FAILURE
            room = self.max_spans - len(self._records)
            if room >= len(records):
                self._records.extend(records)
            else:
                self._records.extend(records[: max(room, 0)])
                first_drop = self._dropped == 0
                self._dropped += len(records) - max(room, 0)
                if first_drop:
                    log.warning("perfetto.buffer_full", path=str(self.path), max_spans=self.max_spans)
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Write every span buffered so far. Returns False when the write failed (logged)."""
        return self._write()

    def shutdown(self) -> None:
        """Write the file one last time and free the buffer; later exports return FAILURE. Idempotent."""
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
        self._write()
        with self._lock:
            self._records = []

    def _write(self) -> bool:
        with self._lock:
            records = list(self._records)
            dropped = self._dropped
        tmp = self.path.with_name(self.path.name + ".tmp")
        with self._write_lock:
            try:
                with open(tmp, "w", encoding="utf-8") as file:
                    _write_trace(file, records, dropped)
                os.replace(tmp, self.path)
            except (OSError, ValueError) as exc:
                log.error("perfetto.write_failed", path=str(self.path), error=repr(exc), spans=len(records))
                return False
        return True


def _metadata(used_tracks: set[str]) -> Iterator[dict[str, Any]]:
    yield {"ph": "M", "name": "process_name", "pid": _PID, "tid": 0, "args": {"name": PROCESS_NAME}}
    for index, track in enumerate(TRACKS):
        if track in _OPTIONAL_TRACKS and track not in used_tracks:
            continue
        tid = _TID[track]
        yield {"ph": "M", "name": "thread_name", "pid": _PID, "tid": tid, "args": {"name": track}}
        yield {"ph": "M", "name": "thread_sort_index", "pid": _PID, "tid": tid, "args": {"sort_index": index}}


def _events(records: list[_Record], origin: int) -> Iterator[dict[str, Any]]:
    for name, start, end, trace_id, span_id, parent_id, attributes in records:
        track = track_of(name, attributes)
        args = {key: _arg(value) for key, value in attributes.items()}
        args["trace_id"] = f"{trace_id:032x}"
        args["span_id"] = f"{span_id:016x}"
        if parent_id is not None:
            args["parent_span_id"] = f"{parent_id:016x}"
        yield {
            "name": name,
            "cat": track,
            "ph": "X",
            "ts": round((start - origin) / 1000, 3),
            "dur": round((end - start) / 1000, 3),
            "pid": _PID,
            "tid": _TID[track],
            "args": args,
        }


def _write_trace(file: Any, records: list[_Record], dropped: int) -> None:
    # Parents before children at equal start times: the trace importer nests by order.
    records.sort(key=lambda r: (r[1], r[1] - r[2]))
    origin = records[0][1] if records else 0
    used = {track_of(r[0], r[6]) for r in records}
    encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
    other = {"origin_unix_ns": origin, "dropped_spans": dropped, "producer": PROCESS_NAME}
    file.write('{"displayTimeUnit":"ms","otherData":' + encoder.encode(other) + ',"traceEvents":[\n')
    file.write(",\n".join(encoder.encode(event) for event in _metadata(used)))
    chunk: list[str] = []
    for event in _events(records, origin):
        chunk.append(encoder.encode(event))
        if len(chunk) >= _WRITE_CHUNK:
            file.write(",\n" + ",\n".join(chunk))
            chunk = []
    if chunk:
        file.write(",\n" + ",\n".join(chunk))
    file.write("\n]}\n")
