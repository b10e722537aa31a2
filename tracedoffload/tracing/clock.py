"""Turning offloader markers into wall-clock nanoseconds, off the hot path.

A marker is host-clock nanoseconds (CPU path) or a CUDA timing event (GPU path). Both are
relative clocks, so each generation takes an anchor: a (marker, time.time_ns()) pair taken
together; a marker's wall time is the anchor's wall time plus the marker's distance from the
anchor. Re-anchoring at every generation start, and every `REANCHOR_EVERY_S` between two steps
of a long one (`recorder.py`), keeps drift between the clocks and the loss of precision bounded.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class HostClock:
    """Markers from `time.perf_counter_ns()` (monotonic, high resolution)."""

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


class CudaClock:
    """Markers are `torch.cuda.Event(enable_timing=True)` recorded on the stream that did the work.

    `anchor()` synchronizes once (called at a generation start and every 10 s between steps,
    never per layer). `resolve()` runs
    on the telemetry thread: `Event.synchronize()` waits for that one event only and releases the
    GIL while it waits, so the model's thread is never held up.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def anchor(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        event.synchronize()
        return (event, time.time_ns())

    def resolve(self, anchor: Any, marker: torch.cuda.Event) -> int:
        event, wall_ns = anchor
        marker.synchronize()
        return wall_ns + int(event.elapsed_time(marker) * 1_000_000)


def clock_for(device: torch.device) -> HostClock | CudaClock:
    return CudaClock(device) if device.type == "cuda" else HostClock()
