"""`CountingExporter`: counts what another exporter received, delivered and lost, and never raises.

A span exporter runs on the batch processor's worker thread; an exception there is logged by the
SDK and the batch is gone, uncounted. Wrapped, every span is accounted for, and a collector that
is down shows as a number that grows rather than as silence.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from tracedoffload.logs import get_logger

log = get_logger("tracedoffload.tracing.exporters.counting")

__all__ = ["CountingExporter", "ExportCounts"]


@dataclasses.dataclass(frozen=True, slots=True)
class ExportCounts:
    """Spans seen by a `CountingExporter`, at one moment."""

    received: int = 0  # handed to export()
    exported: int = 0  # in batches the inner exporter reported as SUCCESS
    failed: int = 0  # in batches that returned FAILURE or raised

    @property
    def pending(self) -> int:
        """Spans inside an `export` call that has not returned yet."""
        return self.received - self.exported - self.failed


class CountingExporter(SpanExporter):
    """Wraps a span exporter: counts spans received, exported and failed; never raises.

    An exception from the inner exporter's `export` becomes FAILURE; one from `shutdown` or
    `force_flush` becomes None or False. An inner exporter that keeps only part of a batch and
    still answers SUCCESS (the Perfetto exporter at its cap) says so through a `dropped_spans`
    counter: the spans it dropped in that call are counted as failed, not exported. Each kind of failure (a FAILURE result, or an exception
    type, per method) is logged once, with the counts at that moment; later ones are only counted.

    Thread safety: counters are updated under a lock and read as one consistent `ExportCounts`.
    Blocking: exactly as the inner exporter; the counting itself never blocks for long.

    Example:
        >>> exporter = CountingExporter(otlp_span_exporter(timeout_s=5))
        >>> provider.add_span_processor(BatchSpanProcessor(exporter))
        >>> exporter.counts().failed

    Args:
        inner: The exporter doing the work.
    """

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._received = 0
        self._exported = 0
        self._failed = 0
        self._logged: set[str] = set()

    def counts(self) -> ExportCounts:
        """A consistent snapshot of the counters."""
        with self._lock:
            return ExportCounts(received=self._received, exported=self._exported, failed=self._failed)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export through the inner exporter. Returns its result, or FAILURE if it raised."""
        count = len(spans)
        with self._lock:
            self._received += count
        dropped_before = self._inner_dropped()
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # the worker thread must survive whatever the exporter does
            self._record(count, ok=False)
            self._log_once(f"export:{type(exc).__qualname__}", "export.raised", error=repr(exc), spans=count)
            return SpanExportResult.FAILURE
        ok = result == SpanExportResult.SUCCESS
        if ok:
            # Exported on this thread only (the batcher's), so the counter's change is this call's.
            dropped = min(count, max(0, self._inner_dropped() - dropped_before))
            self._record(dropped, ok=False)
            count -= dropped
        self._record(count, ok=ok)
        if not ok:
            self._log_once("export:failure", "export.failed", result=str(result), spans=count)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Delegate; False when the inner exporter returned False or raised."""
        try:
            return bool(self.inner.force_flush(timeout_millis))
        except Exception as exc:
            self._log_once(f"force_flush:{type(exc).__qualname__}", "force_flush.raised", error=repr(exc))
            return False

    def shutdown(self) -> None:
        """Delegate; an exception from the inner exporter is logged, not raised."""
        try:
            self.inner.shutdown()
        except Exception as exc:
            self._log_once(f"shutdown:{type(exc).__qualname__}", "shutdown.raised", error=repr(exc))

    def _inner_dropped(self) -> int:
        dropped = getattr(self.inner, "dropped_spans", 0)
        return dropped if isinstance(dropped, int) else 0

    def _record(self, count: int, *, ok: bool) -> None:
        with self._lock:
            if ok:
                self._exported += count
            else:
                self._failed += count

    def _log_once(self, kind: str, event: str, **fields: object) -> None:
        with self._lock:
            if kind in self._logged:
                return
            self._logged.add(kind)
        counts = self.counts()
        log.error(
            f"exporter.{event}",
            exporter=type(self.inner).__name__,
            received=counts.received,
            exported=counts.exported,
            failed=counts.failed,
            note="logged once per kind; later failures are only counted",
            **fields,
        )
