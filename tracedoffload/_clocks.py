"""The one clock seam: how a timing marker is taken on the hot path and how it is read later.

A marker is host-clock nanoseconds (CPU path) or a CUDA timing event recorded on the stream that
did the work (GPU path). The offloader's streams own a clock and take markers with it; a tracing
session reads the same clock at attach (`offloader.streams.clock`) to resolve them, off the hot
path, so what is taken and how it is read cannot drift apart.

Both are relative clocks, so each resolution uses an anchor: a (marker, time.time_ns()) pair
taken together; a marker's wall time is the anchor's wall time plus the marker's distance from
it. Re-anchoring when a generation starts on an idle model, and every `REANCHOR_EVERY_S` between
two steps (tracing/recorder.py), keeps drift between the clocks and the loss of precision bounded.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import torch


class HostClock:
    """Markers from `time.perf_counter_ns()` (monotonic, high resolution); the anchor is the
    offset to wall-clock ns, so resolving a marker is one addition."""

    host = True

    def mark(self) -> int:
        return time.perf_counter_ns()

    def mark_on(self, stream: Any) -> int:
        return time.perf_counter_ns()

    def anchor(self) -> Any:
        # The two clocks are read one after the other; of three tries the pair read closest
        # together is kept, so a preemption between two reads does not shift a whole generation.
        best_gap, offset = None, 0
        for _ in range(3):
            before = time.perf_counter_ns()
            wall = time.time_ns()
            after = time.perf_counter_ns()
            if best_gap is None or after - before < best_gap:
                best_gap, offset = after - before, wall - (before + after) // 2
        return offset

    def resolve(self, anchor: Any, marker: int) -> int:
        return anchor + marker

    def recycle(self, markers: list[Any]) -> None:
        """Host-clock markers are plain integers; nothing to give back."""


class CudaClock:
    """Markers are pooled `torch.cuda.Event(enable_timing=True)`s recorded on a stream.

    Creating an event per layer per token would cost a driver call each time, so read events come
    back to a pool (`recycle`, from the telemetry thread: deque append and pop are atomic).
    `anchor()` synchronizes once (at an idle generation start and every 10 s between steps, never
    per layer). `resolve()` runs on the telemetry thread: `Event.synchronize()` waits for that one
    event only and releases the GIL while it waits, so the model's thread is never held up.
    """

    host = False

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._events: collections.deque[torch.cuda.Event] = collections.deque()

    def mark(self) -> torch.cuda.Event:
        return self.mark_on(torch.cuda.current_stream(self.device))

    def mark_on(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        try:
            event = self._events.pop()
        except IndexError:
            event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def anchor(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        event.synchronize()
        return (event, time.time_ns())

    def resolve(self, anchor: Any, marker: torch.cuda.Event) -> int:
        event, wall_ns = anchor
        marker.synchronize()
        return wall_ns + int(event.elapsed_time(marker) * 1_000_000)

    def recycle(self, markers: list[Any]) -> None:
        self._events.extend(m for m in markers if m is not None)
