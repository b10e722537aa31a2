"""Fault injection: real leaks on real allocations, so leak detection is proven, not assumed; a
corrupted copy, so `verify` is proven to find one.

- "host" reproduces seed 003's leak: every transfer makes a fresh pinned copy of the layer's host
  buffer and keeps it (a plain host copy where pinning is unavailable, e.g. without CUDA).
- "device" keeps one tensor per step on the compute device (in host memory on a CPU device).

Injected as a `Timeline` wrapper, the outermost one, so it sees every transfer and step end.
Never use outside a test or a drill: the memory is only given back by `release()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tracedoffload._exceptions import ConfigError
from tracedoffload.timeline import TRANSFER, LayerRecord, Timeline

if TYPE_CHECKING:
    import torch

    from tracedoffload.offloader import Offloader

LEAK_KINDS = ("host", "device")
DEVICE_LEAK_BYTES_PER_STEP = 2 << 20


class _Wrapping(Timeline):
    """Hands every boundary on to `inner`: a fault overrides the boundary it spoils."""

    def __init__(self, inner: Timeline) -> None:
        self.inner = inner

    def step_begin(self, marker: object, rows: int = 1, length: int = 1, cached: int | None = None) -> None:
        self.inner.step_begin(marker, rows, length, cached)

    def layer(self, record: LayerRecord) -> None:
        self.inner.layer(record)

    def step_end(self, marker: object) -> None:
        self.inner.step_end(marker)


class LeakInjector(_Wrapping):
    """Forwards every boundary to `inner` after leaking on purpose."""

    def __init__(self, inner: Timeline, offloader: Offloader, kind: str, device_bytes_per_step: int = DEVICE_LEAK_BYTES_PER_STEP) -> None:
        if kind not in LEAK_KINDS:
            raise ConfigError("inject_leak", kind, f"one of {list(LEAK_KINDS)}")
        super().__init__(inner)
        self.offloader = offloader
        self.kind = kind
        self.device_bytes_per_step = device_bytes_per_step
        import torch  # here, not at the top: the command line reads LEAK_KINDS without torch

        self._pin = torch.cuda.is_available()
        self.kept: list[torch.Tensor] = []

    @property
    def leaked_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kept)

    def layer(self, record: LayerRecord) -> None:
        if self.kind == "host" and record.kind == TRANSFER:
            source = self.offloader.host_buffer(record.layer_index)
            self.kept.append(source.pin_memory() if self._pin else source.clone())
        super().layer(record)

    def step_end(self, marker: object) -> None:
        if self.kind == "device":
            import torch

            # Filled, not just allocated: untouched pages would not count in RSS on a CPU device.
            self.kept.append(torch.ones(self.device_bytes_per_step, dtype=torch.uint8, device=self.offloader.device))
        super().step_end(marker)

    def release(self) -> None:
        self.kept.clear()


def inject_leak(offloader: Offloader, kind: str) -> LeakInjector:
    """Wrap `offloader`'s current timeline in a `LeakInjector` (attach tracing first)."""
    injector = LeakInjector(offloader.timeline, offloader, kind)
    offloader.timeline = injector
    return injector


class CorruptTransfers(_Wrapping):
    """Zeroes the device copy of offloaded layer `layer` after each of its transfers, so that
    `verify` has a divergence to find: a drill for a copy path that cannot be trusted.

    The zeros are copied like the layer itself (`streams.copy`, the copy stream on CUDA): they
    land after the layer's copy and before its forward reads the slot, whatever the streams. The
    host copy is untouched, so the model is whole again once the offloader is detached."""

    def __init__(self, inner: Timeline, offloader: Offloader, layer: int) -> None:
        import torch

        super().__init__(inner)
        self.offloader, self.layer_index = offloader, layer
        self._zeros = torch.zeros(offloader.layer_bytes(layer), dtype=torch.uint8)

    def layer(self, record: LayerRecord) -> None:
        super().layer(record)
        if record.kind == TRANSFER and record.layer_index == self.layer_index:
            slot = self.offloader._slot_of[self.layer_index]  # a drill reaches into the slot it spoils
            self.offloader.streams.copy(slot.flat[: self._zeros.numel()], self._zeros, slot.fences, timed=False)
