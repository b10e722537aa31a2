"""The telemetry of one `tracedoffload run`: flags, and the wiring from them to a tracing session,
exporters, memory monitor, metrics endpoint and fault injection."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import structlog
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import CollectorRegistry

from tracedoffload._exceptions import ConfigError
from tracedoffload.faults import LEAK_KINDS, LeakInjector, inject_leak
from tracedoffload.logs import LOG_FORMATS, LOG_LEVELS
from tracedoffload.metrics import OffloadMetrics, check_port_free, serve_metrics
from tracedoffload.monitor import MemoryMonitor
from tracedoffload.offloader import Offloader
from tracedoffload.tracing import names
from tracedoffload.tracing.exporters.jsonl import OtlpJsonLinesExporter
from tracedoffload.tracing.exporters.otlp import (
    PROTOCOLS,
    check_otlp_settings,
    otlp_metric_exporter,
    otlp_requested,
    otlp_span_exporter,
)
from tracedoffload.tracing.exporters.perfetto import PerfettoExporter
from tracedoffload.tracing.sampling import LEVELS, SamplingPolicy
from tracedoffload.tracing.session import TracingSession, default_resource
from tracedoffload.tracing.summary import profile_summary

log = structlog.get_logger("tracedoffload.cli")

DEFAULT_TRACE_DIR = Path("traces")
MAX_LINGER_S = 86_400


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tracing = parser.add_argument_group("tracing", "one trace per token, linked to its generation (standard OTEL_* variables apply)")
    tracing.add_argument("--trace-level", choices=LEVELS, default="layer", help="what is exported: off, generation, token, layer (default layer: layer spans of the tokens the tail rule picks)")
    tracing.add_argument("--full-detail", action="store_true", help="export every token's layer spans (no sampling)")
    tracing.add_argument("--first-tokens", type=int, default=SamplingPolicy.first_tokens, help="tokens of each generation always exported with layer detail (default %(default)s)")
    tracing.add_argument("--sample-every", type=int, default=SamplingPolicy.every_n, help="1 in N of the other tokens exported with layer detail (default %(default)s)")
    tracing.add_argument("--slow-token-ms", type=float, default=None, help="tokens slower than this always get layer detail")
    tracing.add_argument("--relative-p95", type=float, default=SamplingPolicy.relative_to_p95, help="tokens slower than this times the running p95 get layer detail (default %(default)s)")
    tracing.add_argument("--trace-file", type=Path, default=None, help="OTLP JSON-lines trace file (default traces/run-<time>.otlp.jsonl)")
    tracing.add_argument("--no-trace-file", action="store_true", help="write no trace file")
    tracing.add_argument("--otlp-endpoint", default=None, help="export over OTLP to this collector (default: OTEL_EXPORTER_OTLP_ENDPOINT when set)")
    tracing.add_argument("--otlp-protocol", choices=PROTOCOLS, default=None, help="grpc or http/protobuf (default: OTEL_EXPORTER_OTLP_PROTOCOL, else grpc)")
    tracing.add_argument("--perfetto", type=Path, default=None, help="also write a Chrome/Perfetto trace JSON (open in ui.perfetto.dev)")
    tracing.add_argument("--trace-per-generation", action="store_true", help="one trace per generation instead of one per token (short runs)")
    tracing.add_argument("--profile-every", type=int, default=None, help="print a profiling summary every N tokens")
    tracing.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar on stderr (default: when stderr is a terminal)")
    tracing.add_argument("--log-format", choices=LOG_FORMATS, default="console", help="log lines as console text or JSON (default console)")
    tracing.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    memory = parser.add_argument_group("memory and metrics")
    memory.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (0: any free port)")
    memory.add_argument("--metrics-addr", default="127.0.0.1", help="address of the metrics endpoint (default 127.0.0.1)")
    memory.add_argument("--metrics-linger", type=float, default=0.0, help="keep serving metrics this many seconds after the run (for a final scrape)")
    memory.add_argument("--inject-leak", choices=LEAK_KINDS, default=None, help="fault injection: leak host memory per transfer (seed 003) or a device tensor per token")


def check_arguments(args: argparse.Namespace) -> SamplingPolicy:
    """Validate every telemetry flag before any model work; returns the sampling policy."""
    for name in ("profile_every",):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(name, value, "an integer >= 1")
    if not (math.isfinite(args.metrics_linger) and 0 <= args.metrics_linger <= MAX_LINGER_S):
        raise ConfigError("metrics_linger", args.metrics_linger, f"seconds between 0 and {MAX_LINGER_S}")
    if args.trace_level != "off":
        if args.otlp_endpoint or otlp_requested():
            check_otlp_settings(args.otlp_endpoint, args.otlp_protocol)
        if not args.no_trace_file:
            # The default is resolved here, so it is checked like a given path.
            args.trace_file = args.trace_file or DEFAULT_TRACE_DIR / f"run-{time.strftime('%Y%m%d-%H%M%S')}.otlp.jsonl"
            _check_output_path("trace_file", args.trace_file)
        if args.perfetto is not None:
            _check_output_path("perfetto", args.perfetto)
    if args.metrics_port is not None:
        check_port_free(args.metrics_port, args.metrics_addr)
    if args.inject_leak and args.trace_level == "off":
        raise ConfigError("inject_leak", args.inject_leak, "used with tracing on: leaks are detected from the token readings (drop --trace-level off)")
    if args.full_detail:
        return SamplingPolicy(level=args.trace_level, every_n=1)
    return SamplingPolicy(
        level=args.trace_level,
        first_tokens=args.first_tokens,
        every_n=args.sample_every,
        slow_token_ms=args.slow_token_ms,
        relative_to_p95=args.relative_p95,
    )


def _check_output_path(field: str, path: Path) -> None:
    """A file that can be written: not a directory, in a directory that exists (or can be made) and
    is writable. Checked before the model loads, so a typo does not cost a whole run."""
    if path.is_dir():
        raise ConfigError(field, str(path), "a file path (this is a directory)")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(field, str(path), f"a file in a directory that can be created ({error.strerror})") from None
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(field, str(path), "a writable file path")


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
    progress: _ProgressBar | None = None

    def finish(self, timeout_s: float = 10.0) -> None:
        """Flush and close the exporters (bounded); keep the statistics."""
        if self.session is not None:
            self.session.shutdown(timeout_s)
            if self.progress is not None:
                self.progress.close()
            self.stats = self.session.snapshot()
            if self.metrics is not None:
                self.metrics.spans_dropped(self.stats.get("dropped_spans", 0))
        if self.meter_provider is not None:
            # Sends the last OTLP metrics; bounded by the exporter's own timeout.
            self.meter_provider.shutdown(timeout_millis=timeout_s * 1000)
        if self.injector is not None:
            log.info("fault.leaked", kind=self.injector.kind, leaked_bytes=self.injector.leaked_bytes)

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
    """Attach tracing, memory monitoring, metrics and fault injection to `offloader`."""
    telemetry = RunTelemetry()
    if policy.level == "off":
        return telemetry
    exporters: list[SpanExporter] = []
    if not args.no_trace_file:
        telemetry.trace_file = args.trace_file  # resolved and checked by check_arguments
        exporters.append(OtlpJsonLinesExporter(telemetry.trace_file))
    if args.otlp_endpoint or otlp_requested():
        exporters.append(otlp_span_exporter(args.otlp_endpoint, args.otlp_protocol))
    if args.perfetto:
        telemetry.perfetto = args.perfetto
        exporters.append(PerfettoExporter(args.perfetto))
    session = TracingSession(exporters, policy=policy, per_token_traces=not args.trace_per_generation)
    otlp = bool(args.otlp_endpoint or otlp_requested())
    if args.metrics_port is not None or otlp:
        registry = CollectorRegistry()
        telemetry.meter_provider = _meter_provider(args) if otlp else MeterProvider()
        telemetry.metrics = OffloadMetrics(model_name, registry=registry, meter_provider=telemetry.meter_provider)
        if args.metrics_port is not None:
            telemetry.metrics_server, telemetry.metrics_port = serve_metrics(registry, args.metrics_port, args.metrics_addr)
            log.info("metrics.serving", url=f"http://{args.metrics_addr}:{telemetry.metrics_port}/metrics")
    telemetry.monitor = MemoryMonitor(offloader, kv_bytes_per_token, metrics=telemetry.metrics)
    session.monitor_memory(telemetry.monitor)
    if telemetry.metrics is not None:
        metrics = telemetry.metrics
        session.add_token_listener(
            lambda timing, stats: metrics.token(
                timing.duration_ns,
                names.PHASE_PREFILL if timing.payload.token_index == 0 else names.PHASE_DECODE,
                timing.payload.trace_id,
                timing.payload.span_id,
                [(r.kind, e - s) for r, s, e in zip(timing.payload.records, timing.starts, timing.ends)],
                timing.sums[names.TOKEN_TRANSFER_BYTES],
            )
        )
    if args.progress or (args.progress is None and sys.stderr.isatty()):
        # One step per new token: the prefill makes the first, each decode step one more.
        telemetry.progress = _ProgressBar(args.max_new_tokens)
        session.add_token_listener(telemetry.progress)
    if args.profile_every:
        every = args.profile_every
        session.add_token_listener(lambda timing, stats: _maybe_profile(stats, every))
    session.attach(offloader)
    if args.inject_leak:
        telemetry.injector = inject_leak(offloader, args.inject_leak)
        log.warning("fault.injected", kind=args.inject_leak, note="memory is leaked on purpose; the leak detector should flag it")
    telemetry.session = session
    return telemetry


def _meter_provider(args: argparse.Namespace) -> MeterProvider:
    """OTLP metrics every 5 s (and at shutdown), to the same collector as the traces."""
    exporter = otlp_metric_exporter(args.otlp_endpoint, args.otlp_protocol)
    return MeterProvider(resource=default_resource(), metric_readers=[PeriodicExportingMetricReader(exporter, export_interval_millis=5000)])


def _maybe_profile(stats: Any, every: int) -> None:
    if stats.tokens and stats.tokens % every == 0:
        end_progress_line()
        print(profile_summary(stats.snapshot(), stats.tokens), file=sys.stderr, flush=True)


class _ProgressBar:
    """A one-line progress bar on stderr, updated from the telemetry thread; anything else written
    to stderr meanwhile (log lines from any thread) first ends the bar's line: `end_progress_line`."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total = total
        self.width = width
        self.started = time.monotonic()
        self._mid_line = False  # the bar is drawn and the cursor is after it
        self._lock = threading.Lock()  # a redraw and a line break from two threads do not interleave
        _ACTIVE_BARS.append(self)

    def __call__(self, timing: Any, stats: Any) -> None:
        done = min(stats.tokens, self.total)
        filled = self.width * done // self.total
        rate = done / max(1e-9, time.monotonic() - self.started)
        with self._lock:
            print(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} steps  {rate:.1f} steps/s", end="", file=sys.stderr, flush=True)
            self._mid_line = True
        if done >= self.total:
            self.break_line()

    def break_line(self) -> None:
        """End the bar's line, so whatever is printed next starts on its own."""
        with self._lock:
            if self._mid_line:
                print(file=sys.stderr, flush=True)
                self._mid_line = False

    def close(self) -> None:
        self.break_line()
        if self in _ACTIVE_BARS:
            _ACTIVE_BARS.remove(self)


_ACTIVE_BARS: list[_ProgressBar] = []


def end_progress_line() -> None:
    """Before writing to stderr: end a progress bar's line, if one is drawn."""
    for bar in list(_ACTIVE_BARS):
        bar.break_line()
