"""The telemetry of one `tracedoffload run`: the wiring from its checked flags
(`telemetry_flags.py`) to a tracing session, exporters, memory monitor, metrics endpoint and
fault injection, and its end: statistics first, then one bounded flush of what is exported."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter
from prometheus_client import CollectorRegistry

from tracedoffload.cli.progress import ProgressBar, end_progress_line
from tracedoffload.faults import LeakInjector, inject_leak
from tracedoffload.logs import get_logger
from tracedoffload.metrics import OffloadMetrics, serve_metrics
from tracedoffload.memory.monitor import MemoryMonitor
from tracedoffload.offloader import Offloader
from tracedoffload.tracing.exporters.jsonl import OtlpJsonLinesExporter
from tracedoffload.tracing.exporters.otlp import otlp_metric_exporter, otlp_span_exporter
from tracedoffload.tracing.exporters.perfetto import PerfettoExporter
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import TracingSession, default_resource
from tracedoffload.tracing.summary import profile_summary

log = get_logger("tracedoffload.cli")

# Where the SDK's exporters and periodic metric reader log their retries and failures.
_SDK_EXPORT_LOGGERS = ("opentelemetry.exporter", "opentelemetry.sdk.metrics", "opentelemetry.sdk._shared_internal")


@dataclasses.dataclass
class RunTelemetry:
    session: TracingSession | None = None
    monitor: MemoryMonitor | None = None
    metrics: OffloadMetrics | None = None
    injector: LeakInjector | None = None
    trace_file: Path | None = None
    perfetto: Path | None = None
    metrics_server: Any = None
    metrics_port: int | None = None
    meter_provider: MeterProvider | None = None
    stats: dict[str, Any] | None = None
    progress: ProgressBar | None = None
    otlp_target: str | None = None  # where OTLP goes, for the line that says what was not sent
    exports_spans: bool = False  # whether any exporter (file, OTLP, console, Perfetto) takes spans
    restore_sdk_logs: Callable[[], None] | None = None

    def finish_statistics(self, timeout_s: float = 30.0) -> None:
        """Aggregate every finished token (local work, no network) and keep the statistics: the
        summary is printed from them before anything waits on a collector."""
        if self.session is None:
            return
        self.session.drain(timeout_s)
        if self.progress is not None:
            self.progress.close()
        self.stats = self.session.snapshot()
        if self.injector is not None:
            log.info("fault.leaked", kind=self.injector.kind, leaked_bytes=self.injector.leaked_bytes)

    def flush_exports(self, budget_s: float) -> None:
        """Send what is still queued, traces and metrics side by side, within one budget. Lost
        spans are reported by the session (`tracing.spans_lost`, one line); metrics still being
        sent when the budget ends get one line here."""
        if self.session is None:
            return
        deadline = time.monotonic() + budget_s
        metrics_closer = None
        if self.meter_provider is not None:
            provider = self.meter_provider
            metrics_closer = threading.Thread(target=lambda: provider.shutdown(timeout_millis=budget_s * 1000), daemon=True)
            metrics_closer.start()
        self.session.shutdown(budget_s)
        if metrics_closer is not None:
            metrics_closer.join(max(0.0, deadline - time.monotonic()))
            if metrics_closer.is_alive():
                log.warning("metrics.not_sent", to=self.otlp_target, hint=f"the last metrics were still being sent when --export-budget {budget_s:g} s ran out")
        if self.metrics is not None:
            self.metrics.spans_dropped(self.session.dropped_spans)
        if self.restore_sdk_logs is not None:
            self.restore_sdk_logs()

    def linger_and_close(self, linger_s: float) -> None:
        if self.metrics_server is None:
            return
        if linger_s > 0:
            log.info("metrics.linger", seconds=linger_s, port=self.metrics_port)
            time.sleep(linger_s)
        self.metrics_server.shutdown()
        self.metrics_server.server_close()
        if self.monitor is not None:
            self.monitor.close()


def start(args: argparse.Namespace, policy: SamplingPolicy, offloader: Offloader, model_name: str, kv_bytes_per_token: int) -> RunTelemetry:
    """Attach tracing, memory monitoring, metrics and fault injection to `offloader`, as the flags
    checked by `telemetry_flags.check_arguments` ask."""
    telemetry = RunTelemetry()
    if policy.level == "off":
        return telemetry
    if args.log_level != "debug":
        telemetry.restore_sdk_logs = quiet_sdk_export_logs()
    otel = args.otel
    exporters: list[SpanExporter] = []
    if args.trace_file is not None:
        telemetry.trace_file = args.trace_file
        exporters.append(OtlpJsonLinesExporter(telemetry.trace_file))
    if args.otlp:
        exporters.append(otlp_span_exporter(args.otlp_endpoint, args.otlp_protocol))
        telemetry.otlp_target = args.otlp_endpoint or "the OTEL_EXPORTER_OTLP_* endpoint"
    if "console" in otel.traces_exporters and otel.traces_exporter_set and not otel.sdk_disabled:
        exporters.append(ConsoleSpanExporter(out=sys.stderr))  # stdout carries the summary
    if args.perfetto:
        telemetry.perfetto = args.perfetto
        exporters.append(PerfettoExporter(args.perfetto))
    session = TracingSession(exporters, policy=policy, per_step_traces=not args.trace_per_generation)
    telemetry.exports_spans = bool(exporters)
    readers = _metric_readers(args)
    if args.metrics_port is not None or readers:
        registry = CollectorRegistry()
        telemetry.meter_provider = MeterProvider(resource=default_resource(), metric_readers=readers)
        telemetry.metrics = OffloadMetrics(model_name, registry=registry, meter_provider=telemetry.meter_provider)
        if args.metrics_port is not None:
            telemetry.metrics_server, telemetry.metrics_port = serve_metrics(registry, args.metrics_port, args.metrics_addr)
            log.info("metrics.serving", url=f"http://{args.metrics_addr}:{telemetry.metrics_port}/metrics")
    telemetry.monitor = MemoryMonitor(offloader, kv_bytes_per_token, metrics=telemetry.metrics)
    session.monitor_memory(telemetry.monitor)
    if telemetry.metrics is not None:
        telemetry.metrics.subscribe(session)
    if args.progress or (args.progress is None and sys.stderr.isatty()):
        telemetry.progress = ProgressBar(args.max_new_tokens)
        session.add_step_listener(telemetry.progress)
    if args.profile_every:
        every = args.profile_every
        session.add_step_listener(lambda timing, stats: _maybe_profile(stats, every))
    session.attach(offloader)
    if args.inject_leak:
        telemetry.injector = inject_leak(offloader, args.inject_leak)
        log.warning("fault.injected", kind=args.inject_leak, note="memory is leaked on purpose; the leak detector should flag it")
    telemetry.session = session
    return telemetry


def _metric_readers(args: argparse.Namespace) -> list[MetricReader]:
    """OTLP metrics every 5 s (and at shutdown) to the traces' collector, as OTEL_METRICS_EXPORTER
    allows (unset: with OTLP traces); console metrics on stderr when it names console."""
    otel = args.otel
    if otel.sdk_disabled:
        return []
    readers: list[MetricReader] = []
    if args.otlp and "otlp" in otel.metrics_exporters:
        exporter = otlp_metric_exporter(args.otlp_endpoint, args.otlp_protocol)
        readers.append(PeriodicExportingMetricReader(exporter, export_interval_millis=5000))
    if "console" in otel.metrics_exporters and otel.metrics_exporter_set:
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr), export_interval_millis=5000))
    return readers


def quiet_sdk_export_logs() -> Callable[[], None]:
    """Silence the SDK's exporters for the run; returns what puts their log levels back.

    They log every retry and failure (a dozen lines for one collector that is down, some
    mid-generation); the run counts lost spans itself and says so in one line at the end
    (`RunTelemetry.flush_exports`). `--log-level debug` keeps them."""
    loggers = [logging.getLogger(name) for name in _SDK_EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)

    def restore() -> None:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)

    return restore


def _maybe_profile(stats: Any, every: int) -> None:
    if stats.steps and stats.steps % every == 0:
        end_progress_line()
        print(profile_summary(stats.snapshot(), stats.steps), file=sys.stderr, flush=True)
