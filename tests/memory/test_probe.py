"""Memory readings: host readings work without a GPU; device readings are absent, never zero."""

from __future__ import annotations

import sys
import types

import torch

from tracedoffload.memory.probe import MemoryProbe, _Nvml


class TestMemoryProbe:
    def test_host_rss_is_read_and_device_is_absent_on_cpu(self):
        """On a CPU device the RSS is a positive byte count and the device reading is None."""
        probe = MemoryProbe(torch.device("cpu"))
        quiet = probe.quiet_point()
        assert quiet.host_rss_bytes > 10 * 2**20
        assert quiet.device_allocated_bytes is None
        assert all(value is None for value in probe.details())
        probe.close()

    def test_rss_follows_a_real_allocation(self):
        """Touching 64 MiB raises the RSS reading by about that much."""
        probe = MemoryProbe(torch.device("cpu"))
        before = probe.quiet_point().host_rss_bytes
        block = torch.ones(64 * 2**20, dtype=torch.uint8)
        after = probe.quiet_point().host_rss_bytes
        assert after - before > 48 * 2**20
        del block
        probe.close()


class FailingNvml(types.ModuleType):
    """A test fake for an NVML whose driver is missing (a fault this machine cannot cause)."""

    def nvmlInit(self):
        raise RuntimeError("NVML Shared Library Not Found")


class TestNvmlDegradation:
    def test_missing_nvml_gives_absent_readings(self, monkeypatch):
        """When NVML cannot start, its readings are (None, None, None) and nothing raises."""
        monkeypatch.setitem(sys.modules, "pynvml", FailingNvml("pynvml"))
        nvml = _Nvml(torch.device("cuda", 0))
        assert nvml.read() == (None, None, None)
