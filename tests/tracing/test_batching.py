"""SpanBatcher: batches bounded, a full queue refuses a token whole, flush and shutdown export all."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext, TraceFlags

from tracedoffload._exceptions import ConfigError
from tracedoffload.tracing.batching import SpanBatcher
from tracedoffload.tracing.fanout import ExportSettings
from tracedoffload.tracing.exporters.counting import CountingExporter

LONG_DELAY_S = 30.0  # never reached by a passing test: exports must come from size, flush or shutdown


class Recording(SpanExporter):
    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.shutdowns = 0
        self.gate = gate

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append([span.context.span_id for span in spans])
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.shutdowns += 1


def token(first_id: int, count: int) -> list[ReadableSpan]:
    resource = Resource({"service.name": "batching"})
    return [ReadableSpan("s", SpanContext(1, first_id + n, False, TraceFlags(1)), resource=resource) for n in range(count)]


def test_a_full_batch_is_exported_without_waiting_for_the_delay():
    exporter = Recording()
    batcher = SpanBatcher(exporter, max_queue_size=100, schedule_delay_s=LONG_DELAY_S, max_export_batch_size=4)
    batcher.offer(token(1, 3))
    batcher.offer(token(4, 3))
    deadline = time.monotonic() + 5
    while not exporter.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    assert exporter.batches and len(exporter.batches[0]) <= 4
    batcher.shutdown()
    assert sum(exporter.batches, []) == list(range(1, 7))  # every span once, in order
    assert all(len(batch) <= 4 for batch in exporter.batches)


def test_the_schedule_delay_exports_a_part_batch():
    exporter = Recording()
    batcher = SpanBatcher(exporter, max_queue_size=100, schedule_delay_s=0.05, max_export_batch_size=512)
    batcher.offer(token(1, 2))
    deadline = time.monotonic() + 5
    while not exporter.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    assert exporter.batches == [[1, 2]]
    batcher.shutdown()


def test_a_full_queue_refuses_a_token_whole_and_counts_it():
    gate = threading.Event()  # the exporter is stuck: nothing leaves the queue
    exporter = Recording(gate)
    batcher = SpanBatcher(exporter, max_queue_size=10, schedule_delay_s=LONG_DELAY_S, max_export_batch_size=1000)
    assert batcher.offer(token(1, 6))
    assert not batcher.offer(token(7, 6))  # 12 > 10: none of the 6 is queued
    assert batcher.offer(token(13, 4))
    assert batcher.dropped == 6
    gate.set()
    batcher.shutdown()
    assert sum(exporter.batches, []) == [*range(1, 7), *range(13, 17)]


def test_force_flush_exports_what_is_queued_and_is_bounded_by_its_timeout():
    exporter = Recording()
    batcher = SpanBatcher(exporter, max_queue_size=100, schedule_delay_s=LONG_DELAY_S, max_export_batch_size=512)
    batcher.offer(token(1, 3))
    assert batcher.force_flush(5)
    assert exporter.batches == [[1, 2, 3]]
    batcher.shutdown()

    gate = threading.Event()
    stuck = SpanBatcher(Recording(gate), max_queue_size=100, schedule_delay_s=LONG_DELAY_S, max_export_batch_size=512)
    stuck.offer(token(1, 1))
    started = time.monotonic()
    assert not stuck.force_flush(0.2)
    assert time.monotonic() - started < LONG_DELAY_S / 2  # near its 0.2 s budget; generous for a loaded host
    gate.set()
    stuck.shutdown()


def test_shutdown_exports_the_rest_refuses_more_and_shuts_the_exporter_once():
    exporter = Recording()
    batcher = SpanBatcher(exporter, max_queue_size=100, schedule_delay_s=LONG_DELAY_S, max_export_batch_size=512)
    batcher.offer(token(1, 5))
    batcher.shutdown()
    batcher.shutdown()  # the tracer provider calls it again at exit
    assert exporter.batches == [[1, 2, 3, 4, 5]]
    assert exporter.shutdowns == 1
    assert not batcher.offer(token(6, 2))
    assert batcher.dropped == 2


def test_a_raising_exporter_loses_its_batch_not_the_thread():
    class Raising(Recording):
        def export(self, spans):
            if spans[0].context.span_id == 1:
                raise RuntimeError("backend exploded")
            return super().export(spans)

    counted = CountingExporter(Raising())
    batcher = SpanBatcher(counted, max_queue_size=100, schedule_delay_s=LONG_DELAY_S, max_export_batch_size=2)
    batcher.offer(token(1, 2))
    batcher.offer(token(3, 2))
    assert batcher.force_flush(5)
    batcher.shutdown()
    counts = counted.counts()
    assert (counts.failed, counts.exported) == (2, 2)


def test_an_unwrapped_raising_exporter_does_not_stop_later_batches():
    class RaisingOnce(Recording):
        def export(self, spans):
            if spans[0].context.span_id == 1:
                raise RuntimeError("backend exploded")
            return super().export(spans)

    exporter = RaisingOnce()
    batcher = SpanBatcher(exporter, max_queue_size=100, schedule_delay_s=LONG_DELAY_S, max_export_batch_size=2)
    batcher.offer(token(1, 2))
    batcher.offer(token(3, 2))
    assert batcher.force_flush(5)
    batcher.shutdown()
    assert exporter.batches == [[3, 4]]


class TestExportSettings:
    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("max_export_batch_size", 0),  # would have the export thread spin
            ("schedule_delay_millis", -5),
            ("schedule_delay_millis", 0.5),
            ("max_queue_size", 0),
            ("max_queue_size", True),
        ],
    )
    def test_bad_bounds_name_the_field(self, field, value):
        with pytest.raises(ConfigError) as caught:
            ExportSettings(**{field: value})
        assert caught.value.field == field

    def test_a_batch_larger_than_the_queue_is_refused(self):
        with pytest.raises(ConfigError, match="max_queue_size"):
            ExportSettings(max_queue_size=10, max_export_batch_size=20)


def test_shutdown_keeps_to_its_deadline_and_leaves_a_stuck_exporter_alone():
    """A batcher whose exporter is stuck in an export returns from shutdown at its deadline
    (False), without calling the exporter's shutdown under the running export; released, a
    later shutdown finishes the job once."""
    gate = threading.Event()
    exporter = Recording(gate)
    batcher = SpanBatcher(exporter, max_queue_size=100, schedule_delay_s=LONG_DELAY_S, max_export_batch_size=512)
    batcher.offer(token(1, 1))
    batcher.request_flush()
    result: list[bool] = []
    caller = threading.Thread(target=lambda: result.append(batcher.shutdown(time.monotonic() + 0.2)))
    caller.start()
    caller.join(LONG_DELAY_S)
    assert not caller.is_alive(), "shutdown waited on the stuck exporter"
    assert result == [False] and exporter.shutdowns == 0
    gate.set()
    assert batcher.shutdown(time.monotonic() + LONG_DELAY_S)
    assert batcher.shutdown() and exporter.shutdowns == 1


def test_fanout_flush_and_shutdown_share_one_deadline_across_exporters():
    """Four stuck exporters: a flush and a shutdown of 1 s each end after about 1 s, not 4 s in
    turn (the bound is generous; in turn would take 4 s)."""
    from tracedoffload.tracing.fanout import ExportFanout

    gate = threading.Event()
    fanout = ExportFanout([Recording(gate) for _ in range(4)], ExportSettings(schedule_delay_millis=int(LONG_DELAY_S * 1000)))
    try:
        fanout.export(token(1, 2))
        started = time.monotonic()
        assert not fanout.force_flush(1000)
        assert not fanout.shutdown(1.0)
        assert time.monotonic() - started < 3.5
    finally:
        gate.set()
    assert fanout.shutdown(LONG_DELAY_S)
