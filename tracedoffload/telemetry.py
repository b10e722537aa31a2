"""Telemetry as a library: one settings object and one context manager that wire a tracing
session, its exporters, the memory monitor, the metrics (Prometheus endpoint and OTLP) and fault
injection to an offloaded model. `tracedoffload run` uses it; so does any program serving a model.

    settings = TelemetrySettings.resolve(trace_file="run.otlp.jsonl", metrics_port=9464)
    with Telemetry(settings, offloader, "my-model", kv_bytes_per_token) as telemetry:
        with telemetry.session.generation("my-model", input_tokens=n) as handle:
            ...
    print(telemetry.stats)  # aggregated before anything waited on a collector

Each setting is resolved argument -> environment -> default, and checked; a bad value raises
`ConfigError` naming the setting (and the variable, when it came from one). The `OTEL_*`
variables keep their specification's meaning (`tracing/otel_env.py`).

The end (`close`, or leaving the block): the statistics first (local work, no network), then one
bounded flush of traces and metrics side by side within `export_budget_s`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tracedoffload._checks import check_choice, check_number
from tracedoffload._exceptions import ConfigError
from tracedoffload.faults import LEAK_KINDS
from tracedoffload.logs import get_logger
from tracedoffload.tracing.otel_env import OtelEnvironment, read_otel_environment
from tracedoffload.tracing.sampling import LEVELS, SamplingPolicy

log = get_logger("tracedoffload.telemetry")

# Where the SDK's exporters and periodic metric reader log their retries and failures.
_SDK_EXPORT_LOGGERS = ("opentelemetry.exporter", "opentelemetry.sdk.metrics", "opentelemetry.sdk._shared_internal")
MAX_EXPORT_BUDGET_S = 600.0
BUDGET_VALID = f"seconds, more than 0 and at most {MAX_EXPORT_BUDGET_S:.0f}"
METRICS_EXPORT_INTERVAL_MS = 5000

# setting -> its environment variable (the OTEL_* ones are read by otel_env.py).
ENVIRONMENT = {
    "trace_level": "TRACEDOFFLOAD_TRACE_LEVEL",
    "trace_file": "TRACEDOFFLOAD_TRACE_FILE",
    "metrics_port": "TRACEDOFFLOAD_METRICS_PORT",
    "metrics_addr": "TRACEDOFFLOAD_METRICS_ADDR",
    "export_budget_s": "TRACEDOFFLOAD_EXPORT_BUDGET",
}


@dataclasses.dataclass(frozen=True)
class TelemetrySettings:
    """What to trace and where it goes; build it with `resolve` (checked), not directly.

    Fields:
        sampling: level of detail and the tail rule (`trace_level` sets its level).
        trace_file: an OTLP JSON-lines file, or None; `append`: add to an existing one.
        otlp: whether traces (and metrics, as OTEL_METRICS_EXPORTER allows) go over OTLP, to
            `otlp_endpoint` (None: the OTEL_EXPORTER_OTLP_* endpoint) with `otlp_protocol`.
        perfetto: a Chrome/Perfetto JSON file, or None.
        per_step_traces: one trace per step (False: one per generation).
        metrics_port, metrics_addr: the Prometheus endpoint (None: none; 0: any free port).
        memory: monitor memory and detect leaks.
        inject_leak: fault injection ("host" or "device"), for drills only.
        export_budget_s: the most the end waits for traces and metrics to be sent.
        quiet_sdk_logs: keep the SDK exporters' retry lines out of the log while running.
        otel: the checked OTEL_* environment.
    """

    sampling: SamplingPolicy = dataclasses.field(default_factory=SamplingPolicy)
    trace_file: Path | None = None
    append: bool = False
    otlp: bool = False
    otlp_endpoint: str | None = None
    otlp_protocol: str | None = None
    perfetto: Path | None = None
    per_step_traces: bool = True
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    memory: bool = True
    inject_leak: str | None = None
    export_budget_s: float = 5.0
    quiet_sdk_logs: bool = True
    otel: OtelEnvironment = dataclasses.field(default_factory=read_otel_environment)

    @classmethod
    def resolve(
        cls,
        *,
        trace_level: str | None = None,
        sampling: SamplingPolicy | None = None,
        trace_file: str | Path | None = None,
        append: bool = False,
        otlp_endpoint: str | None = None,
        otlp_protocol: str | None = None,
        perfetto: str | Path | None = None,
        per_step_traces: bool = True,
        metrics_port: int | None = None,
        metrics_addr: str | None = None,
        memory: bool = True,
        inject_leak: str | None = None,
        export_budget_s: float | None = None,
        quiet_sdk_logs: bool = True,
    ) -> TelemetrySettings:
        """Each setting from its argument, else its environment variable (`ENVIRONMENT`), else
        the default; every one checked before anything starts (files writable, the port free).

        Raises:
            ConfigError: naming the setting, or the variable it was read from.
        """
        otel = read_otel_environment()
        level = _pick("trace_level", trace_level, None)
        if level is not None:
            check_choice(_source("trace_level", trace_level), level, LEVELS)
        if sampling is None:
            sampling = SamplingPolicy(level=level or "layer")
        elif level is not None and level != sampling.level:
            sampling = dataclasses.replace(sampling, level=level)
        file = _pick("trace_file", trace_file, None)
        port = _pick("metrics_port", metrics_port, None)
        if port is not None:
            port = _integer(_source("metrics_port", metrics_port), port)
        addr = _pick("metrics_addr", metrics_addr, "127.0.0.1")
        budget = _pick("export_budget_s", export_budget_s, 5.0)
        budget = _number(_source("export_budget_s", export_budget_s), budget)
        if budget == 0:
            raise ConfigError(_source("export_budget_s", export_budget_s), budget, BUDGET_VALID)
        check_number(_source("export_budget_s", export_budget_s), budget, 0, MAX_EXPORT_BUDGET_S, BUDGET_VALID)
        if inject_leak is not None:
            check_choice("inject_leak", inject_leak, LEAK_KINDS)
            if sampling.level == "off":
                raise ConfigError("inject_leak", inject_leak, "used with tracing on: leaks are detected from the step readings (not with trace level off)")
        if otlp_endpoint and otel.sdk_disabled:
            raise ConfigError("otlp_endpoint", otlp_endpoint, "not with OTEL_SDK_DISABLED=true (which means no telemetry leaves the process)")
        otlp = False
        if sampling.level != "off":
            from tracedoffload.tracing.exporters.otlp import check_otlp_settings, otlp_requested

            otlp = bool(otlp_endpoint or otlp_requested())
            if otlp:
                check_otlp_settings(otlp_endpoint, otlp_protocol)
            if file is not None:
                file = Path(file)
                if file.is_file() and not append:
                    # Two runs in one file read back as one run with two prefills: say so first.
                    raise ConfigError(_source("trace_file", trace_file), str(file), "a new file (it exists: pass --append to add this run to it, or another path)")
                check_output_path(_source("trace_file", trace_file), file)
            if perfetto is not None:
                perfetto = Path(perfetto)
                check_output_path("perfetto", perfetto)
        else:
            file = perfetto = None
        if port is not None:
            from tracedoffload.metrics import check_port_free

            try:
                check_port_free(port, addr)
            except ConfigError as error:
                raise ConfigError(_source("metrics_port", metrics_port), error.value, error.valid) from None
        return cls(
            sampling=sampling,
            trace_file=file,
            append=append,
            otlp=otlp,
            otlp_endpoint=otlp_endpoint,
            otlp_protocol=otlp_protocol,
            perfetto=perfetto,
            per_step_traces=per_step_traces,
            metrics_port=port,
            metrics_addr=addr,
            memory=memory,
            inject_leak=inject_leak,
            export_budget_s=budget,
            quiet_sdk_logs=quiet_sdk_logs,
            otel=otel,
        )


class Telemetry:
    """A tracing session with its exporters, memory monitor, metrics and fault injection,
    attached to `offloader` on entry; statistics, then a bounded flush, on exit.

    Args:
        settings: from `TelemetrySettings.resolve`.
        offloader: the running offloader to trace.
        model_name: the `model` label of every metric, and the generations' default model name.
        kv_bytes_per_token: KV bytes per token held (`planner.kv_bytes_per_token`); 0 for a KV
            cache allocated up front (a paged cache), whose growth the leak detector must not expect.
        metrics: record metrics (into `registry`) even with no endpoint or OTLP reader configured
            (a server serves them on its own /metrics).
        local_exporters: span exporters that keep the spans in this process (`run --html`'s
            report collector), beside those the settings ask for. They do not count as exporting
            the traces (`exports_spans`): a trace id they hold opens in no tracing UI.

    Attributes (after entry): `session` (None with the trace level off), `metrics`, `monitor`,
    `injector`, `metrics_port` (the bound port); after exit: `stats`.
    """

    def __init__(
        self, settings: TelemetrySettings, offloader: Any, model_name: str, kv_bytes_per_token: int, *, metrics: bool = False, local_exporters: Sequence[Any] = ()
    ) -> None:
        self.settings = settings
        self.local_exporters = list(local_exporters)
        self.want_metrics = metrics
        self.offloader = offloader
        self.model_name = model_name
        self.kv_bytes_per_token = kv_bytes_per_token
        self.session: Any = None
        self.metrics: Any = None
        self.monitor: Any = None
        self.injector: Any = None
        self.meter_provider: Any = None  # the SDK's, when metrics are exported (flushed at the end)
        self.meters: Any = None  # the provider the instruments come from (the SDK's, or a no-op one)
        self.registry: Any = None  # the Prometheus registry of the metrics, when there are metrics
        self.metrics_port: int | None = None
        self.exports_spans = False
        self.stats: dict[str, Any] | None = None
        self._metrics_server: Any = None
        self._restore_sdk_logs: Any = None
        self._flushed = False
        self._closed = False

    @property
    def otlp_target(self) -> str | None:
        if not self.settings.otlp:
            return None
        return self.settings.otlp_endpoint or "the OTEL_EXPORTER_OTLP_* endpoint"

    def __enter__(self) -> Telemetry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Build and attach everything the settings ask for."""
        from prometheus_client import CollectorRegistry

        from tracedoffload.memory.monitor import MemoryMonitor
        from tracedoffload.metrics import OffloadMetrics, serve_metrics
        from tracedoffload.tracing.session import TracingSession

        settings = self.settings
        if settings.sampling.level == "off":
            return
        if settings.quiet_sdk_logs:
            self._restore_sdk_logs = quiet_sdk_export_logs()
        exporters = self._span_exporters()
        self.exports_spans = bool(exporters)
        session = TracingSession([*exporters, *self.local_exporters], policy=settings.sampling, per_step_traces=settings.per_step_traces)
        readers = self._metric_readers()
        if settings.metrics_port is not None or readers or self.want_metrics:
            from opentelemetry.sdk.metrics import MeterProvider

            from tracedoffload.tracing.session import default_resource

            registry = self.registry = CollectorRegistry()
            if readers:
                self.meter_provider = MeterProvider(resource=default_resource(), metric_readers=readers)
                provider: Any = self.meter_provider
            else:
                # Nothing would ever read the OpenTelemetry instruments: the no-op provider's cost
                # 0.3 µs a recording where the SDK's, reader or not, costs 2.3 µs, about 50 per
                # step (a histogram point per layer transfer and compute).
                from opentelemetry.metrics import NoOpMeterProvider

                provider = NoOpMeterProvider()
            self.meters = provider
            self.metrics = OffloadMetrics(self.model_name, registry=registry, meter_provider=provider)
            self.metrics.subscribe(session)
            if settings.metrics_port is not None:
                self._metrics_server, self.metrics_port = serve_metrics(registry, settings.metrics_port, settings.metrics_addr)
                log.info("metrics.serving", url=f"http://{settings.metrics_addr}:{self.metrics_port}/metrics")
        if settings.memory:
            self.monitor = MemoryMonitor(self.offloader, self.kv_bytes_per_token, metrics=self.metrics)
            session.monitor_memory(self.monitor)
        session.attach(self.offloader)
        if settings.inject_leak:
            from tracedoffload.faults import inject_leak

            self.injector = inject_leak(self.offloader, settings.inject_leak)
            log.warning("fault.injected", kind=settings.inject_leak, note="memory is leaked on purpose; the leak detector should flag it")
        self.session = session

    def finish_statistics(self, timeout_s: float = 30.0) -> dict[str, Any] | None:
        """Aggregate every finished step (local work, no network) and keep the statistics."""
        if self.session is None:
            return None
        self.session.drain(timeout_s)
        self.stats = self.session.snapshot()
        if self.injector is not None:
            log.info("fault.leaked", kind=self.injector.kind, leaked_bytes=self.injector.leaked_bytes)
        return self.stats

    def flush_exports(self, budget_s: float | None = None) -> None:
        """Send what is still queued, traces and metrics side by side, within one budget. Lost
        spans are reported by the session (`tracing.spans_lost`, one line); metrics still being
        sent when the budget ends get one line here."""
        if self.session is None or self._flushed:
            return
        self._flushed = True
        budget_s = self.settings.export_budget_s if budget_s is None else budget_s
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
                log.warning("metrics.not_sent", to=self.otlp_target, hint=f"the last metrics were still being sent when the export budget of {budget_s:g} s ran out")
        if self.metrics is not None:
            self.metrics.spans_dropped(self.session.dropped_spans)
        if self._restore_sdk_logs is not None:
            self._restore_sdk_logs()
            self._restore_sdk_logs = None

    def close(self) -> None:
        """Statistics, bounded flush, metrics endpoint and memory probe closed (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.stats is None:
            self.finish_statistics()
        self.flush_exports()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self.monitor is not None:
            self.monitor.close()

    def _span_exporters(self) -> list[Any]:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        from tracedoffload.tracing.exporters.jsonl import OtlpJsonLinesExporter
        from tracedoffload.tracing.exporters.otlp import otlp_span_exporter
        from tracedoffload.tracing.exporters.perfetto import PerfettoExporter

        settings, otel = self.settings, self.settings.otel
        exporters: list[Any] = []
        if settings.trace_file is not None:
            exporters.append(OtlpJsonLinesExporter(settings.trace_file))
        if settings.otlp:
            exporters.append(otlp_span_exporter(settings.otlp_endpoint, settings.otlp_protocol))
        if "console" in otel.traces_exporters and otel.traces_exporter_set and not otel.sdk_disabled:
            exporters.append(ConsoleSpanExporter(out=sys.stderr))  # stdout may carry a program's output
        if settings.perfetto is not None:
            exporters.append(PerfettoExporter(settings.perfetto))
        return exporters

    def _metric_readers(self) -> list[Any]:
        """OTLP metrics every 5 s (and at shutdown) to the traces' collector, as
        OTEL_METRICS_EXPORTER allows (unset: with OTLP traces); console metrics on stderr when it
        names console."""
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

        from tracedoffload.tracing.exporters.otlp import otlp_metric_exporter

        settings, otel = self.settings, self.settings.otel
        if otel.sdk_disabled:
            return []
        readers: list[Any] = []
        if settings.otlp and "otlp" in otel.metrics_exporters:
            exporter = otlp_metric_exporter(settings.otlp_endpoint, settings.otlp_protocol)
            readers.append(PeriodicExportingMetricReader(exporter, export_interval_millis=METRICS_EXPORT_INTERVAL_MS))
        if "console" in otel.metrics_exporters and otel.metrics_exporter_set:
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr), export_interval_millis=METRICS_EXPORT_INTERVAL_MS))
        return readers


def quiet_sdk_export_logs() -> Any:
    """Silence the SDK's exporters while running; returns what puts their log levels back.

    They log every retry and failure (a dozen lines for one collector that is down, some
    mid-generation); the session counts lost spans itself and says so in one line at the end."""
    loggers = [logging.getLogger(name) for name in _SDK_EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)

    def restore() -> None:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)

    return restore


def check_output_path(field: str, path: Path) -> None:
    """A file that can be written: not a directory, in a directory that exists (or can be made) and
    is writable. Checked before any model work, so a typo does not cost a whole run."""
    if path.is_dir():
        raise ConfigError(field, str(path), "a file path (this is a directory)")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(field, str(path), f"a file in a directory that can be created ({error.strerror})") from None
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(field, str(path), "a writable file path")


def _pick(setting: str, given: Any, default: Any) -> Any:
    """The argument when given, else the setting's environment variable when set, else the default."""
    if given is not None:
        return given
    value = os.environ.get(ENVIRONMENT[setting], "").strip()
    return value if value else default


def _source(setting: str, given: Any) -> str:
    """How an error names the setting: the argument, or the variable it came from."""
    if given is None and os.environ.get(ENVIRONMENT[setting], "").strip():
        return ENVIRONMENT[setting]
    return setting


def _integer(field: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(field, value, "a TCP port from 1 to 65535, or 0 for any free port") from None
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(field, value, "a TCP port from 1 to 65535, or 0 for any free port")
    return number


def _number(field: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(field, value, BUDGET_VALID) from None
