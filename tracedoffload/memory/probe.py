"""Memory readings: host (RSS, pinned bytes) always; device (torch allocator, NVML) when present.

Two speeds. `quiet_point()` is taken on the model's thread at the end of every step, when every
offloaded layer has been released: one `pread` of /proc/self/statm and, on CUDA, one allocator
counter, a few microseconds. `details()` (allocator statistics, NVML) runs on the telemetry thread.
A reading that cannot be had is None ("absent"), never 0: on a host without a GPU the device
fields are absent and the host fields still work.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
from tracedoffload.logs import get_logger

log = get_logger("tracedoffload.memory")

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class QuietPoint(NamedTuple):
    """Memory at the end of a step (all offloaded layers released; the KV cache still held)."""

    host_rss_bytes: int | None
    device_allocated_bytes: int | None


class MemoryDetails(NamedTuple):
    """The slower readings, taken off the hot path. None = not available here."""

    device_reserved_bytes: int | None
    device_peak_bytes: int | None
    alloc_retries: int | None
    ooms: int | None
    nvml_used_bytes: int | None
    nvml_total_bytes: int | None
    nvml_process_bytes: int | None


class MemoryProbe:
    """Reads host and device memory for one compute device.

    Threading: `quiet_point` on the model's thread; `details` on the telemetry thread.
    Never raises: a failing source is logged once and reported as absent from then on.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._statm = _open_statm()
        self._nvml = _Nvml(device) if self._cuda else None

    def quiet_point(self) -> QuietPoint:
        return QuietPoint(self._rss(), torch.cuda.memory_allocated(self.device) if self._cuda else None)

    def details(self) -> MemoryDetails:
        reserved = peak = retries = ooms = None
        if self._cuda:
            stats = torch.cuda.memory_stats(self.device)
            reserved = stats.get("reserved_bytes.all.current")
            peak = stats.get("allocated_bytes.all.peak")
            retries = stats.get("num_alloc_retries")
            ooms = stats.get("num_ooms")
        used = total = process = None
        if self._nvml is not None:
            used, total, process = self._nvml.read()
        return MemoryDetails(reserved, peak, retries, ooms, used, total, process)

    def _rss(self) -> int | None:
        if self._statm is None:
            return None
        try:
            fields = os.pread(self._statm, 128, 0).split()
            return int(fields[1]) * _PAGE_SIZE
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        if self._statm is not None:
            os.close(self._statm)
            self._statm = None


def _open_statm() -> int | None:
    try:
        return os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:
        log.warning("memory.rss_unavailable", reason="/proc/self/statm cannot be read; host RSS is absent")
        return None


class _Nvml:
    """NVML readings for one device; absent (and logged once) when NVML is missing or failing."""

    def __init__(self, device: torch.device) -> None:
        self._handle: Any = None
        self._pynvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._pynvml = pynvml
        except Exception as error:  # noqa: BLE001 - NVML is optional: no driver, no library, no permission
            log.warning("memory.nvml_unavailable", error=repr(error), effect="NVML readings are absent; torch allocator readings still work")

    def read(self) -> tuple[int | None, int | None, int | None]:
        if self._handle is None:
            return None, None, None
        try:
            info = self._pynvml.nvmlDeviceGetMemoryInfo(self._handle)
            pid = os.getpid()
            process = next(
                (p.usedGpuMemory for p in self._pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle) if p.pid == pid),
                None,
            )
            return int(info.used), int(info.total), process
        except Exception as error:  # noqa: BLE001
            log.warning("memory.nvml_failed", error=repr(error), effect="NVML readings are absent from now on")
            self._handle = None
            return None, None, None
