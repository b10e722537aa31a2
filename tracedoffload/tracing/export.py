"""From span processors to exporters: one BatchSpanProcessor per exporter, with drops counted.

A span is lost when the batch processor's queue is full, when the exporter fails, or when
shutdown comes before it was sent. The SDK counts none of these for us without its internal
metrics, so each exporter is wrapped in a `CountingExporter` and every span handed over is
counted here: after shutdown, handed minus exported is exactly what was lost.
"""

from __future__ import annotations

import dataclasses
import threading

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from tracedoffload.tracing.exporters.counting import CountingExporter


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """Bounds on the export path (the BatchSpanProcessor's, with shorter waits than its defaults)."""

    max_queue_size: int = 8192
    schedule_delay_millis: int = 500
    max_export_batch_size: int = 512
    export_timeout_millis: int = 5000


class ExportFanout(SpanProcessor):
    """Hands each span to every exporter's BatchSpanProcessor. Never blocks, never raises."""

    def __init__(self, exporters: list[SpanExporter], settings: ExportSettings) -> None:
        self.exporters = [CountingExporter(e) for e in exporters]
        self._processors = [
            BatchSpanProcessor(
                counted,
                max_queue_size=settings.max_queue_size,
                schedule_delay_millis=settings.schedule_delay_millis,
                max_export_batch_size=settings.max_export_batch_size,
                export_timeout_millis=settings.export_timeout_millis,
            )
            for counted in self.exporters
        ]
        self._lock = threading.Lock()
        self.handed = 0

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            self.handed += 1
        for processor in self._processors:
            try:
                processor.on_end(span)
            except Exception:  # noqa: BLE001 - counted below as never exported
                pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(processor.force_flush(timeout_millis) for processor in self._processors)

    def shutdown(self) -> None:
        """Send what is queued and stop; may wait on a slow exporter (callers bound it)."""
        for processor in self._processors:
            processor.shutdown()

    def lost(self) -> int:
        """Spans handed over but not (yet) exported, summed over exporters; exact after shutdown."""
        return sum(max(0, self.handed - e.counts().exported) for e in self.exporters)

    def failed(self) -> int:
        """Spans an exporter reported as failed (a lower bound on `lost` while running)."""
        return sum(e.counts().failed for e in self.exporters)
