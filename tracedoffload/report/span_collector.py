"""`ReportSpanCollector`: a span exporter that digests a run's spans for `run --html`.

It sits beside the run's other exporters and receives exactly what they receive, so the report of
a run equals `report FILE --html` of the run's trace file, without writing or reading one (and
without mixing in an earlier run that `--append` put in the same file).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracedoffload.logs import get_logger
from tracedoffload.report.digest import TraceDigest
from tracedoffload.tracing.spanview import SpanView

log = get_logger("tracedoffload.report")


class ReportSpanCollector(SpanExporter):
    """Feeds every exported span into a `TraceDigest`. Never raises into the export thread.

    Threading: `export` runs on its batcher's thread; read the digest with `digest_now`, which
    takes the same lock (after a shutdown that ran out of time, an export may still be running).
    """

    def __init__(self) -> None:
        self._digest = TraceDigest()
        self._lock = threading.Lock()
        self._closed = False
        self.rejected = 0  # spans the digest refused (not expected of this package's own spans)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        with self._lock:
            for span in spans:
                try:
                    self._digest.add(SpanView.from_readable(span))
                except (ValueError, TypeError) as error:
                    self.rejected += 1
                    if self.rejected == 1:
                        log.error("report.span_rejected", span=span.name, error=str(error))
        return SpanExportResult.SUCCESS

    def digest_now(self) -> TraceDigest:
        """The digest of what has been exported so far. Call it after the session's shutdown;
        the collector takes nothing more afterwards."""
        with self._lock:
            self._closed = True
            return self._digest

    def shutdown(self) -> None:
        """Nothing to release: the digest stays readable after the session shut its exporters."""

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True
