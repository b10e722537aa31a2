"""The telemetry thread: takes finished steps from a bounded queue and turns them into spans.

The model's thread only ever calls `submit`, which never blocks: when the queue is full the step
is dropped and counted, and the generation goes on. A generation's end goes through `submit_last`
instead, never dropped (one per request, not one per step, and losing it would lose the request's
span and figures): it is handled once everything queued before it has been.

The thread works in batches: it handles everything queued, then rests `batch_interval_s` before
looking again. Each wake-up costs CPU beyond the work (a cold cache, a GIL hand-over): telemetry
CPU per token as bench/bench_telemetry_cpu.py reads it, medians of 6 interleaved rounds: with
the default sampling 294 µs waking per token, 144 µs resting 0.1 s, 111 µs resting 0.5 s; at
full detail (another run) 442, 393 and 382 µs resting 0.1, 0.25 and 0.5 s. On a busy host that
CPU is taken from the model. A `drain` or `stop` cuts the rest short.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from typing import Any
from tracedoffload.logs import get_logger


log = get_logger("tracedoffload.tracing")

_STOP = object()
_WAKE = object()


class TelemetryWorker:
    """A daemon thread running `handle(item)` for each submitted item, in order."""

    def __init__(
        self,
        handle: Callable[[Any], None],
        max_queued: int = 1024,
        batch_interval_s: float = 0.25,
        name: str = "tracedoffload-telemetry",
    ) -> None:
        self._handle = handle
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queued)
        self._batch_interval_s = batch_interval_s
        self._wake = threading.Event()  # set by drain/stop: skip the rest between batches
        self._after: collections.deque[Any] = collections.deque()  # submit_last's items
        self.dropped_items = 0
        self.dropped_spans = 0
        self.errors = 0
        self.cpu_s = 0.0  # this thread's CPU seconds so far, as of its last batch
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any, spans: int = 0) -> bool:
        """Queue an item without blocking; False (and counted as dropped) when the queue is full."""
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self.refuse(spans)
            return False

    def submit_last(self, item: Any) -> None:
        """Queue an item beyond the bound, never dropped; handled after every item submitted
        before it. For rare items (one per generation), never per step."""
        self._after.append(item)
        try:
            self._queue.put_nowait(_WAKE)  # an idle thread waits on the queue
        except queue.Full:
            pass  # a full queue means the thread is busy: it reaches the item after the queue

    def refuse(self, spans: int = 0) -> None:
        """Count an item dropped without being queued."""
        self.dropped_items += 1
        self.dropped_spans += spans

    def drain(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every queued item to be handled; True when all were."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks or self._after:
            self._wake.set()  # again each time: steps may still arrive from another thread
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return False
            time.sleep(0.002)
        return True

    def stop(self, timeout_s: float) -> bool:
        """Handle what is queued (within the timeout), then end the thread."""
        deadline = time.monotonic() + timeout_s
        drained = self.drain(timeout_s)
        try:
            self._queue.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            return False
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return drained and not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            item = self._queue.get()  # blocks while idle: no polling between generations
            while True:
                if item is _STOP:
                    self._handle_after()
                    self._queue.task_done()
                    return
                if item is _WAKE:
                    self._queue.task_done()
                else:
                    self._handle_one(item)
                    self._queue.task_done()
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            # Everything submitted before these items was in the queue, now handled.
            self._handle_after()
            if self._batch_interval_s > 0 and not self._wake.is_set():
                self._wake.wait(self._batch_interval_s)
            self._wake.clear()

    def _handle_after(self) -> None:
        while self._after:
            self._handle_one(self._after[0])
            self._after.popleft()  # after handling: drain() waits while it is still there

    def _handle_one(self, item: Any) -> None:
        try:
            self._handle(item)
            self.cpu_s = time.thread_time()  # read by listeners of the next item (metrics)
        except Exception as error:  # noqa: BLE001 - the telemetry thread must outlive any bad step
            self.errors += 1
            if self.errors <= 3:
                log.error("telemetry.step_failed", error=repr(error), errors=self.errors)
