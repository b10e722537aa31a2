"""`MemoryMonitor`: memory readings per step, leak detection, metrics and alert delivery.

Plugged into a `TracingSession`: it takes the quiet-point reading on the model's thread at each
step end (a few microseconds) and does everything else on the telemetry thread, where each step
arrives with the KV tokens its live sequences hold. An alert is delivered four ways: a structlog
warning, an event on the step's span, the `leak_suspected` metric with the estimated bytes per
step, and `on_alert` for the embedding application.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.trace import Event

from tracedoffload import names
from tracedoffload.logs import get_logger
from tracedoffload.memory.leak import LeakAlert, LeakDetector, LeakPolicy
from tracedoffload.memory.probe import MemoryProbe, QuietPoint
from tracedoffload.metrics import OffloadMetrics
from tracedoffload.offloader import Offloader

log = get_logger("tracedoffload.memory")

SOURCES = ("host", "device")


class MemoryMonitor:
    """Watches one offloaded model's memory.

    Args:
        offloader: the model's offloader (its device and pinned bytes).
        kv_bytes_per_token: KV-cache growth per token the planner expects (see planner.kv_bytes_per_token).
        metrics: where gauges go (None: no metrics).
        policy: leak detector thresholds.
        on_alert: called on the telemetry thread with each new `LeakAlert`; must not block.
    """

    def __init__(
        self,
        offloader: Offloader,
        kv_bytes_per_token: int,
        *,
        metrics: OffloadMetrics | None = None,
        policy: LeakPolicy | None = None,
        on_alert: Callable[[LeakAlert], None] | None = None,
    ) -> None:
        self.offloader = offloader
        self.probe = MemoryProbe(offloader.device)
        self.metrics = metrics
        self.on_alert = on_alert
        self.alerts: list[LeakAlert] = []
        self.kv_bytes_per_token = kv_bytes_per_token
        self.detectors = {source: LeakDetector(source, kv_bytes_per_token, policy) for source in SOURCES}
        self._previous: QuietPoint | None = None
        if metrics is not None:
            metrics.expected_kv(kv_bytes_per_token)
            for source in self._sources_present():
                metrics.leak(source, None)

    def quiet_point(self) -> QuietPoint:
        """Model's thread, at a step end: the cheap reading."""
        return self.probe.quiet_point()

    def idle_point(self) -> None:
        """Before a generation starts on an idle model (no sequence live, no KV cache held): the
        reading that judges leaks across generations. Called by the tracing session."""
        idle = self.probe.quiet_point()
        for source, value in zip(SOURCES, idle):
            alert = self.detectors[source].idle_point(value)
            if alert is not None:
                self._deliver(alert, trace_id=None)
            elif self.metrics is not None and value is not None:
                self.metrics.leak(source, self.detectors[source].suspected)

    def on_step(self, step_index: int, kv_tokens: int, quiet: QuietPoint | None, trace_id: int) -> tuple[dict[str, Any], tuple[Event, ...]]:
        """Telemetry thread: judge the reading after a step, when live sequences hold `kv_tokens`;
        return the step span's memory attributes and events."""
        if quiet is None:
            return {}, ()
        # The expected KV growth goes with the readings, so a trace file alone can set the memory
        # against what the live tokens account for (as the leak detector does).
        attributes: dict[str, Any] = {names.MEMORY_PINNED: self.offloader.pinned_bytes, names.MEMORY_KV_EXPECTED_BYTES_PER_TOKEN: self.kv_bytes_per_token}
        previous = self._previous
        if quiet.host_rss_bytes is not None:
            attributes[names.MEMORY_HOST_RSS] = quiet.host_rss_bytes
            if previous is not None and previous.host_rss_bytes is not None:
                attributes[names.MEMORY_HOST_RSS_DELTA] = quiet.host_rss_bytes - previous.host_rss_bytes
        if quiet.device_allocated_bytes is not None:
            attributes[names.MEMORY_DEVICE_ALLOCATED] = quiet.device_allocated_bytes
            if previous is not None and previous.device_allocated_bytes is not None:
                attributes[names.MEMORY_DEVICE_ALLOCATED_DELTA] = quiet.device_allocated_bytes - previous.device_allocated_bytes
        self._previous = quiet
        details = self.probe.details()
        if details.device_reserved_bytes is not None:
            attributes[names.MEMORY_DEVICE_RESERVED] = details.device_reserved_bytes
        if self.metrics is not None:
            self.metrics.memory(quiet, details, self.offloader.pinned_bytes, str(self.offloader.device), kv_tokens)
        events = []
        for source, value in zip(SOURCES, quiet):
            if value is None:
                continue
            detector = self.detectors[source]
            alert = detector.observe(step_index, value, kv_tokens)
            if alert is not None:
                self._deliver(alert, trace_id)
                events.append(Event(names.EVENT_LEAK_SUSPECTED, {"source": alert.source, "bytes_per_step": alert.bytes_per_step, "excess_bytes": alert.excess_bytes}))
            elif self.metrics is not None:
                self.metrics.leak(source, detector.suspected)
        return attributes, tuple(events)

    def _deliver(self, alert: LeakAlert, trace_id: int | None) -> None:
        self.alerts.append(alert)
        log.warning(
            "memory.leak_suspected",
            source=alert.source,
            bytes_per_step=round(alert.bytes_per_step),
            excess_bytes=alert.excess_bytes,
            step_index=alert.step_index,
            scope=alert.scope,
            **({"trace_id": f"{trace_id:032x}"} if trace_id else {}),
        )
        if self.metrics is not None:
            self.metrics.leak(alert.source, alert)
        if self.on_alert is not None:
            try:
                self.on_alert(alert)
            except Exception as error:  # noqa: BLE001 - the application's callback must not stop telemetry
                log.error("memory.alert_callback_failed", error=repr(error))

    def _sources_present(self) -> list[str]:
        return [source for source, value in zip(SOURCES, self.probe.quiet_point()) if value is not None]

    def close(self) -> None:
        self.probe.close()
