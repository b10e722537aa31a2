"""`SpanBatcher`: one exporter's queue and thread, fed a step's spans at a time.

It does what the SDK's `BatchSpanProcessor` does (a bounded queue, batches of at most
`max_export_batch_size`, an export every `schedule_delay` or as soon as a batch is full, flush and
shutdown), with two differences that matter here:

- spans arrive as one list per step: one lock and one `deque.extend` per step instead of a
  processor call per span (about 1 µs each, 57 per step of one sequence at full detail);
- a full queue refuses a step's spans whole, so an exported trace is never missing half its
  layers, and counts them instead of logging a warning per span as the SDK does.

The exporter is called on this thread only, with instrumentation suppressed (as the SDK does) so
an instrumented HTTP client does not trace the export itself.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, attach, set_value
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter


class SpanBatcher:
    """Queues spans for `exporter` and exports them in batches on a daemon thread.

    Threading: `offer` from any thread, never blocks on the exporter; `force_flush` and `shutdown`
    wait for it (callers bound them). Counts: `dropped` spans were refused (queue full or shut
    down); every accepted span is handed to the exporter once.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        max_queue_size: int,
        schedule_delay_s: float,
        max_export_batch_size: int,
        name: str = "tracedoffload-export",
    ) -> None:
        self.exporter = exporter
        self.dropped = 0
        self._max_queue_size = max_queue_size
        self._schedule_delay_s = schedule_delay_s
        self._batch_size = max_export_batch_size
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._condition = threading.Condition()
        self.cpu_s = 0.0  # the export thread's CPU seconds so far, as of its last export
        self._accepted = 0  # spans ever queued
        self._handed = 0  # spans ever handed to the exporter (returned or not)
        self._flush_requested = False
        self._shutdown = False
        self._exporter_closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def offer(self, spans: Sequence[ReadableSpan]) -> bool:
        """Queue `spans` (a token's, whole) unless that would overflow the queue; never blocks."""
        with self._condition:
            if self._shutdown or len(self._queue) + len(spans) > self._max_queue_size:
                self.dropped += len(spans)
                return False
            self._queue.extend(spans)
            self._accepted += len(spans)
            if len(self._queue) >= self._batch_size:
                self._condition.notify()
            return True

    def force_flush(self, timeout_s: float) -> bool:
        """Export everything queued so far; True when it was handed over within `timeout_s`."""
        return self.wait_flushed(self.request_flush(), time.monotonic() + timeout_s)

    def request_flush(self) -> int:
        """Start exporting everything queued so far, without waiting; returns what to wait for."""
        with self._condition:
            self._flush_requested = True
            self._condition.notify()
            return self._accepted

    def wait_flushed(self, target: int, deadline: float) -> bool:
        """Wait until `target` (from `request_flush`) spans were handed over, or the deadline (a
        `time.monotonic()` value) passes; several batchers can share one deadline."""
        with self._condition:
            while self._handed < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._condition.wait(remaining)
        return True

    def shutdown(self, deadline: float | None = None) -> bool:
        """Refuse new spans, export what is queued, then shut the exporter down; True when done.

        Waits at most until `deadline` (a `time.monotonic()` value; None: as long as the exporter
        takes). An exporter still inside an export at the deadline is left to its daemon thread
        and not shut down under it. Only the first call does anything (the tracer provider
        calls it again at exit)."""
        self.request_stop()
        self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            return False
        with self._condition:
            if self._exporter_closed:
                return True
            self._exporter_closed = True
        self.exporter.shutdown()
        return True

    def request_stop(self) -> None:
        """Refuse new spans and start exporting what is queued, without waiting."""
        with self._condition:
            self._shutdown = True
            self._condition.notify()

    def _run(self) -> None:
        attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))  # this thread only ever exports
        while True:
            with self._condition:
                if not self._shutdown and not self._flush_requested and len(self._queue) < self._batch_size:
                    self._condition.wait(self._schedule_delay_s)
                self._flush_requested = False
                stopping = self._shutdown
            self._export_queued()
            self.cpu_s = time.thread_time()
            if stopping:
                return

    def _export_queued(self) -> None:
        while True:
            with self._condition:
                count = min(self._batch_size, len(self._queue))
                if not count:
                    return
                batch = [self._queue.popleft() for _ in range(count)]
            try:
                self.exporter.export(batch)  # a CountingExporter: never raises, counts the outcome
            except Exception:  # noqa: BLE001 - any other exporter: the batch is lost, the thread lives
                pass
            with self._condition:
                self._handed += count
                self._condition.notify_all()  # wakes force_flush waiters
