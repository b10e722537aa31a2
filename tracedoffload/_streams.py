"""Where copies run and how their ordering is enforced: CUDA streams and events, or the CPU mirror.

Both classes expose the same operations, so the offloader has one code path:

- `clock.mark()`: a timing marker on the compute stream (a pooled CUDA event, or host-clock ns on
  CPU; see `_clocks.py`, which also reads them back);
- `copy(dst, src, slot)`: copy a layer into a device slot after the slot's last reader is done,
  returning the copy's start and end markers;
- `wait_ready(slot)`: make the compute stream wait for the slot's copy (no host synchronize);
- `record_free(slot)`: note that every kernel reading the slot has been queued;
- `synchronize()`: drain everything (used only by detach and tests, never per layer).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from tracedoffload._clocks import CudaClock, HostClock

Marker = Any  # int nanoseconds on the CPU path, a torch.cuda.Event on the CUDA path


class SlotFences:
    """The two fences of a device slot: its copy is done (ready); its readers are queued (free)."""

    __slots__ = ("ready", "free")

    def __init__(self, ready: Any = None, free: Any = None) -> None:
        self.ready = ready
        self.free = free


class CpuStreams:
    """The CPU mirror: copies are synchronous memcpys, markers come from the monotonic host clock."""

    kind = "cpu"
    copy_stream_name = "host"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.clock = HostClock()

    def new_fences(self) -> SlotFences:
        return SlotFences()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, fences: SlotFences, timed: bool = True) -> tuple[int | None, int | None]:
        if not timed:
            dst.copy_(src)
            return None, None
        start = time.perf_counter_ns()
        dst.copy_(src)
        return start, time.perf_counter_ns()

    def wait_ready(self, fences: SlotFences) -> None:
        """Nothing to wait for: the CPU copy finished before `copy` returned."""

    def record_free(self, fences: SlotFences) -> None:
        """Nothing to record: CPU kernels have finished when the layer's forward returns."""

    def synchronize(self) -> None:
        """Nothing is in flight on the CPU path."""


class CudaStreams:
    """Copies on a dedicated side stream, ordered against the compute stream by events only.

    Threading: driven from the thread that runs the model; the clock's `recycle` may be called
    from a telemetry thread once it has read the events' times.
    """

    kind = "cuda"
    copy_stream_name = "h2d"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.copy_stream = torch.cuda.Stream(device=device)
        self.clock = CudaClock(device)

    def new_fences(self) -> SlotFences:
        # Fences are never timed; events without timing are cheaper to record and wait on.
        return SlotFences(ready=torch.cuda.Event(), free=torch.cuda.Event())

    def copy(
        self, dst: torch.Tensor, src: torch.Tensor, fences: SlotFences, timed: bool = True
    ) -> tuple[torch.cuda.Event | None, torch.cuda.Event | None]:
        stream = self.copy_stream
        # The slot may still be read by the previous layer's kernels: wait for them on the GPU.
        # An event that was never recorded completes at once, so a fresh slot does not stall.
        stream.wait_event(fences.free)
        start = end = None
        if timed:
            start = self.clock.mark_on(stream)
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        if timed:
            end = self.clock.mark_on(stream)
        fences.ready.record(stream)  # a fence, not a timer: always recorded
        return start, end

    def wait_ready(self, fences: SlotFences) -> None:
        torch.cuda.current_stream(self.device).wait_event(fences.ready)

    def record_free(self, fences: SlotFences) -> None:
        fences.free.record(torch.cuda.current_stream(self.device))

    def synchronize(self) -> None:
        self.copy_stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()


def streams_for(device: torch.device) -> CpuStreams | CudaStreams:
    return CudaStreams(device) if device.type == "cuda" else CpuStreams(device)
