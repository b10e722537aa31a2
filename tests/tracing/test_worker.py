"""The telemetry thread: order, batching, and that drain/stop never wait out a rest."""

from __future__ import annotations

import threading
import time

import pytest

from tracedoffload._exceptions import ConfigError
from tracedoffload.tracing.session import TracingSession
from tracedoffload.tracing.worker import TelemetryWorker

# Far longer than any wait a test below allows: a test that waited out a rest would take 60 s,
# and half of that is a bound no loaded host comes near for work that takes milliseconds.
LONG_REST_S = 60.0


def test_items_are_handled_in_order_across_batches():
    handled: list[int] = []
    worker = TelemetryWorker(handled.append, batch_interval_s=0.01)
    for item in range(50):
        assert worker.submit(item)
        if item % 7 == 0:
            time.sleep(0.003)  # some arrive mid-rest, some together
    assert worker.drain(5.0)
    assert handled == list(range(50))
    assert worker.stop(5.0)


def test_steps_queued_during_a_rest_wait_for_the_next_batch():
    handled: list[int] = []
    first_done = threading.Event()

    def handle(item: int) -> None:
        handled.append(item)
        first_done.set()

    worker = TelemetryWorker(handle, batch_interval_s=1.0)
    worker.submit(0)
    assert first_done.wait(5.0)
    time.sleep(0.05)  # past its look for more: the thread now rests for 1 s
    for item in range(1, 6):
        worker.submit(item)
    time.sleep(0.2)
    assert handled == [0]  # not woken per step
    assert worker.drain(5.0)
    assert handled == [0, 1, 2, 3, 4, 5]
    assert worker.stop(5.0)


def test_drain_and_stop_cut_the_rest_short():
    handled: list[int] = []
    worker = TelemetryWorker(handled.append, batch_interval_s=LONG_REST_S)
    worker.submit(1)
    time.sleep(0.05)  # handled; resting now
    worker.submit(2)
    started = time.monotonic()
    assert worker.drain(LONG_REST_S)
    assert worker.stop(LONG_REST_S)
    assert time.monotonic() - started < LONG_REST_S / 2
    assert handled == [1, 2]


def test_a_failing_step_is_counted_and_the_next_ones_handled():
    handled: list[int] = []

    def handle(item: int) -> None:
        if item == 1:
            raise RuntimeError("bad step")
        handled.append(item)

    worker = TelemetryWorker(handle, batch_interval_s=0.0)
    for item in range(3):
        worker.submit(item)
    assert worker.drain(5.0)
    assert (handled, worker.errors) == ([0, 2], 1)
    assert worker.stop(5.0)


def test_a_full_queue_drops_and_counts_without_blocking():
    release = threading.Event()
    worker = TelemetryWorker(lambda item: release.wait(5.0), max_queued=2, batch_interval_s=0.0)
    accepted = [worker.submit(item, spans=10) for item in range(6)]
    assert not all(accepted)
    assert worker.dropped_items == accepted.count(False)
    assert worker.dropped_spans == 10 * worker.dropped_items
    release.set()
    assert worker.stop(5.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("batch_interval_s", -0.1), ("batch_interval_s", 11), ("batch_interval_s", float("nan")), ("batch_interval_s", "0.1"),
     ("max_queued_steps", 0), ("max_queued_steps", 2.5), ("max_queued_steps", True)],
)
def test_bad_session_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        TracingSession([], **{field: value})


def test_drain_does_not_wait_out_rests_while_steps_keep_arriving():
    handled: list[int] = []
    worker = TelemetryWorker(handled.append, batch_interval_s=LONG_REST_S)

    def produce() -> None:
        for item in range(100):
            worker.submit(item)
            time.sleep(0.002)

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.02)
    started = time.monotonic()
    while producer.is_alive():
        assert worker.drain(LONG_REST_S)
    producer.join()
    assert worker.drain(LONG_REST_S)
    assert time.monotonic() - started < LONG_REST_S / 2
    assert handled == list(range(100))
    assert worker.stop(LONG_REST_S)
