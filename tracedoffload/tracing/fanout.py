"""From the telemetry thread to the exporters: one `SpanBatcher` per exporter, with drops counted.

A span is lost when its exporter's queue is full (refused, a step at a time), when the exporter
fails, or when shutdown comes before it was sent. Each exporter is wrapped in a
`CountingExporter` and every span handed over is counted here: after shutdown, handed minus
exported is exactly what was lost.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter

from tracedoffload._checks import check_int
from tracedoffload._exceptions import ConfigError
from tracedoffload.tracing.batching import SpanBatcher
from tracedoffload.tracing.exporters.counting import CountingExporter


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """Bounds on the export path, per exporter (the SDK batch processor's, with a shorter delay).

    An export's own time limit is the exporter's (OTEL_EXPORTER_OTLP_TIMEOUT for OTLP): the
    SDK's batch processor takes an export timeout but does not enforce it, so none is kept here.
    """

    max_queue_size: int = 8192
    schedule_delay_millis: int = 500
    max_export_batch_size: int = 512

    def __post_init__(self) -> None:
        # A batch size of 0 would have the export thread spin without waiting.
        for field in ("max_queue_size", "schedule_delay_millis", "max_export_batch_size"):
            check_int(field, getattr(self, field), 1)
        if self.max_export_batch_size > self.max_queue_size:
            raise ConfigError("max_export_batch_size", self.max_export_batch_size, f"an integer <= max_queue_size ({self.max_queue_size})")


class ExportFanout(SpanProcessor):
    """Hands spans to every exporter's batcher. Never blocks, never raises.

    `export` takes one step's spans (or one generation span) in one call.
    """

    def __init__(self, exporters: list[SpanExporter], settings: ExportSettings) -> None:
        self.exporters = [CountingExporter(e) for e in exporters]
        self._batchers = [
            SpanBatcher(counted, settings.max_queue_size, settings.schedule_delay_millis / 1000, settings.max_export_batch_size)
            for counted in self.exporters
        ]
        self._lock = threading.Lock()
        self.handed = 0

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        self.export((span,))

    def export(self, spans: Sequence[ReadableSpan]) -> None:
        with self._lock:
            self.handed += len(spans)
        for batcher in self._batchers:
            batcher.offer(spans)  # a refusal is counted as never exported

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Every exporter flushes at once, within one shared deadline (not the whole timeout each
        in turn, which a stuck first exporter would spend for the others)."""
        deadline = time.monotonic() + timeout_millis / 1000
        targets = [batcher.request_flush() for batcher in self._batchers]
        return all([batcher.wait_flushed(target, deadline) for batcher, target in zip(self._batchers, targets)])

    def shutdown(self, timeout_s: float | None = None) -> bool:
        """Send what is queued and stop, every exporter at once, within one deadline (None: as
        long as the exporters take); True when all finished."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for batcher in self._batchers:
            batcher.request_stop()
        return all([batcher.shutdown(deadline) for batcher in self._batchers])

    @property
    def cpu_s(self) -> float:
        """CPU seconds the export threads have spent so far."""
        return sum(batcher.cpu_s for batcher in self._batchers)

    def lost(self) -> int:
        """Spans handed over but not (yet) exported, summed over exporters; exact after shutdown."""
        return sum(max(0, self.handed - e.counts().exported) for e in self.exporters)

    def failed(self) -> int:
        """Spans an exporter refused (queue full) or reported as failed (a lower bound on `lost`
        while running)."""
        return sum(e.counts().failed for e in self.exporters) + sum(b.dropped for b in self._batchers)
