"""Metrics: each step's and each generation's figures recorded to OpenTelemetry instruments
(exported over OTLP when a reader is configured) and to a Prometheus registry (served on /metrics,
with exemplars).

Two sinks because each does what the other cannot here: the OTel SDK exports OTLP metrics, and
prometheus_client exposes exemplars carrying the step's (or the generation's) trace id in the
OpenMetrics format, so a Grafana panel jumps from a slow point to its trace. Names come from
`tracedoffload.names`. `OffloadMetrics.subscribe(session)` has a tracing session feed it.
Threading: recorded from the telemetry thread; the HTTP server runs on its own daemon thread.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tracedoffload import names as mn
from tracedoffload._exceptions import ConfigError
from tracedoffload.memory.leak import LeakAlert
from tracedoffload.memory.probe import MemoryDetails, QuietPoint
from tracedoffload.timeline import COMPUTE, TRANSFER
from tracedoffload.tracing.step_spans import step_phase

if TYPE_CHECKING:
    from tracedoffload.tracing.generations import GenerationResult
    from tracedoffload.tracing.session import TracingSession
    from tracedoffload.tracing.step_spans import StepTiming

DROPPED_READ_INTERVAL_S = 1.0

# Layer operations take tens of microseconds to tens of milliseconds: buckets start below 100 us
# (the Collector's spanmetrics default starts at 2 ms and would put every layer in one bucket).
LAYER_BUCKETS_S = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3)
STEP_BUCKETS_S = (5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0)
# The GenAI semantic conventions' recommended buckets (gen_ai.server.*).
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_BUCKETS_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_TOKENS_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class OffloadMetrics:
    """The metric instruments of one model.

    Args:
        model: the model name, a label on every series.
        registry: the Prometheus registry to register in (default: prometheus_client's global one).
        meter_provider: where OpenTelemetry instruments come from (default: the global provider).
    """

    def __init__(self, model: str, *, registry: CollectorRegistry | None = None, meter_provider: MeterProvider | None = None) -> None:
        self.model = model
        self.registry = registry if registry is not None else REGISTRY
        meter = (meter_provider or _global_meter_provider()).get_meter("tracedoffload")
        phase_labels = [mn.LABEL_MODEL, mn.LABEL_PHASE]
        self._prom: dict[str, Any] = {}
        self._otel: dict[str, Any] = {}
        for name, labels, buckets in (
            (mn.STEP_LATENCY, phase_labels, STEP_BUCKETS_S),
            (mn.TIME_TO_FIRST_TOKEN, [mn.LABEL_MODEL], TTFT_BUCKETS_S),
            (mn.TIME_PER_OUTPUT_TOKEN, [mn.LABEL_MODEL], TPOT_BUCKETS_S),
            (mn.REQUEST_DURATION, [mn.LABEL_MODEL], REQUEST_BUCKETS_S),
            (mn.LAYER_TRANSFER, [mn.LABEL_MODEL], LAYER_BUCKETS_S),
            (mn.LAYER_COMPUTE, [mn.LABEL_MODEL], LAYER_BUCKETS_S),
            (mn.STEP_BATCH_SIZE, [mn.LABEL_MODEL], BATCH_SIZE_BUCKETS),
            (mn.STEP_BATCH_TOKENS, [mn.LABEL_MODEL], BATCH_TOKENS_BUCKETS),
        ):
            self._prom[name.otel] = Histogram(name.prometheus, name.description, labels, buckets=buckets, registry=self.registry)
            self._otel[name.otel] = meter.create_histogram(name.otel, unit=name.unit, description=name.description, explicit_bucket_boundaries_advisory=buckets)
        self._prom[mn.THREAD_CPU.otel] = Counter(mn.THREAD_CPU.prometheus.removesuffix("_total"), mn.THREAD_CPU.description, [mn.LABEL_MODEL, mn.LABEL_THREAD], registry=self.registry)
        self._otel[mn.THREAD_CPU.otel] = meter.create_counter(mn.THREAD_CPU.otel, unit=mn.THREAD_CPU.unit, description=mn.THREAD_CPU.description)
        self._cpu_seen: dict[Any, float] = {}
        for name in (mn.BYTES_COPIED, mn.STEPS, mn.GENERATED_TOKENS, mn.DRAFTED_TOKENS, mn.ACCEPTED_TOKENS, mn.SPANS_DROPPED, mn.ALLOC_RETRIES, mn.OOMS):
            self._prom[name.otel] = Counter(name.prometheus.removesuffix("_total"), name.description, [mn.LABEL_MODEL], registry=self.registry)
            self._otel[name.otel] = meter.create_counter(name.otel, unit=name.unit, description=name.description)
            # Exposed at 0 from the start, so increase() has a first sample to measure from.
            self._prom[name.otel].labels(model=model)
        for name, labels in (
            (mn.GPU_MEMORY_USAGE, [mn.LABEL_MODEL, mn.LABEL_DEVICE]),
            (mn.GPU_MEMORY_LIMIT, [mn.LABEL_MODEL, mn.LABEL_DEVICE]),
            (mn.GPU_PROCESS_MEMORY, [mn.LABEL_MODEL, mn.LABEL_DEVICE]),
            (mn.CUDA_ALLOCATED, [mn.LABEL_MODEL]),
            (mn.CUDA_RESERVED, [mn.LABEL_MODEL]),
            (mn.CUDA_PEAK, [mn.LABEL_MODEL]),
            (mn.PROCESS_RSS, [mn.LABEL_MODEL]),
            (mn.PINNED_HOST, [mn.LABEL_MODEL]),
            (mn.QUIET_POINT, [mn.LABEL_MODEL, mn.LABEL_SOURCE]),
            (mn.LEAK_SUSPECTED, [mn.LABEL_MODEL, mn.LABEL_SOURCE]),
            (mn.LEAK_BYTES_PER_STEP, [mn.LABEL_MODEL, mn.LABEL_SOURCE]),
            (mn.KV_TOKENS, [mn.LABEL_MODEL]),
            (mn.KV_EXPECTED, [mn.LABEL_MODEL]),
        ):
            self._prom[name.otel] = Gauge(name.prometheus, name.description, labels, registry=self.registry)
            self._otel[name.otel] = meter.create_gauge(name.otel, unit=name.unit, description=name.description)
        self._last_counts: dict[str, int] = {}

    # -- recording (telemetry thread) -------------------------------------------------------------

    def subscribe(self, session: TracingSession) -> None:
        """Record every step and every generation `session` traces from now on, and the CPU of
        the threads involved (the telemetry's own cost, next to the model's)."""

        last_drop_read = [0.0]

        def on_step(timing: StepTiming, stats: Any) -> None:
            self.step(timing)
            for thread, seconds in session.telemetry_cpu_s.items():
                self.thread_cpu(thread, thread, seconds)
            # Spans lost so far, live (a server runs for days: its collector may be down now);
            # read once a second at most, not every step (it takes each exporter's lock).
            now = time.monotonic()
            if now - last_drop_read[0] >= DROPPED_READ_INTERVAL_S:
                last_drop_read[0] = now
                self.spans_dropped(session.dropped_spans)

        session.add_step_listener(on_step)
        session.add_generation_listener(self.generation)

    def step(self, timing: StepTiming) -> None:
        """One forward: its latency by phase (exemplar: the step's trace), its layers, its bytes,
        the new tokens it produced and the KV tokens held after it."""
        payload = timing.payload
        seconds = timing.duration_ns / 1e9
        exemplar, ctx = _exemplar(payload.trace_id, payload.span_id)
        self._observe(mn.STEP_LATENCY, seconds, {mn.LABEL_PHASE: step_phase(payload.sequences)}, exemplar, ctx)
        transfer_hist, compute_hist = self._prom[mn.LAYER_TRANSFER.otel].labels(self.model), self._prom[mn.LAYER_COMPUTE.otel].labels(self.model)
        otel_transfer, otel_compute = self._otel[mn.LAYER_TRANSFER.otel], self._otel[mn.LAYER_COMPUTE.otel]
        attributes = {mn.LABEL_MODEL: self.model}
        for record, start, end in zip(payload.records, timing.starts, timing.ends):
            if record.kind == TRANSFER:
                transfer_hist.observe((end - start) / 1e9)
                otel_transfer.record((end - start) / 1e9, attributes)
            elif record.kind == COMPUTE:
                compute_hist.observe((end - start) / 1e9)
                otel_compute.record((end - start) / 1e9, attributes)
        if payload.sequences:  # a forward outside any generation serves none
            self._observe(mn.STEP_BATCH_SIZE, len(payload.sequences), {}, None, None)
            self._observe(mn.STEP_BATCH_TOKENS, sum(s.tokens for s in payload.sequences), {}, None, None)
        self._add(mn.BYTES_COPIED, timing.sums[mn.STEP_TRANSFER_BYTES])
        self._add(mn.STEPS, 1)
        self._add(mn.GENERATED_TOKENS, sum(s.generated for s in payload.sequences))
        drafted = sum(s.drafted for s in payload.sequences)
        if drafted:
            self._add(mn.DRAFTED_TOKENS, drafted)
            self._add(mn.ACCEPTED_TOKENS, sum(s.accepted or 0 for s in payload.sequences))
        self._set(mn.KV_TOKENS, payload.kv_tokens)
        thread_id, seconds = payload.model_cpu
        if thread_id:
            self.thread_cpu("model", thread_id, seconds)

    def thread_cpu(self, label: str, thread: Any, total_s: float) -> None:
        """A thread's CPU so far (`time.thread_time()` read on it): its increase since the last
        reading of the same thread goes to the `thread` label's counter. The first reading of a
        thread is its baseline (what it spent before, loading a model say, is not counted)."""
        previous = self._cpu_seen.get(thread)
        self._cpu_seen[thread] = total_s
        if previous is None:
            return
        increase = total_s - previous
        if increase > 0:
            self._prom[mn.THREAD_CPU.otel].labels(model=self.model, thread=label).inc(increase)
            self._otel[mn.THREAD_CPU.otel].add(increase, {mn.LABEL_MODEL: self.model, mn.LABEL_THREAD: label})

    def generation(self, result: GenerationResult) -> None:
        """One finished generation: its duration, time to first token and time per output token
        (exemplar: the generation's trace)."""
        exemplar, ctx = exemplar_for(result.span_context)
        self._observe(mn.REQUEST_DURATION, result.duration_s, {}, exemplar, ctx)
        if result.time_to_first_token_s is not None:
            self._observe(mn.TIME_TO_FIRST_TOKEN, result.time_to_first_token_s, {}, exemplar, ctx)
        if result.time_per_output_token_s is not None:
            self._observe(mn.TIME_PER_OUTPUT_TOKEN, result.time_per_output_token_s, {}, exemplar, ctx)

    def memory(self, quiet: QuietPoint | None, details: MemoryDetails | None, pinned_bytes: int, device: str, kv_tokens: int | None = None) -> None:
        """Gauges for what was read; absent readings leave their series unset (never a fake 0)."""
        self._set(mn.PINNED_HOST, pinned_bytes)
        if kv_tokens is not None:
            self._set(mn.KV_TOKENS, kv_tokens)
        if quiet is not None:
            if quiet.host_rss_bytes is not None:
                self._set(mn.PROCESS_RSS, quiet.host_rss_bytes)
                self._set(mn.QUIET_POINT, quiet.host_rss_bytes, {mn.LABEL_SOURCE: "host"})
            if quiet.device_allocated_bytes is not None:
                self._set(mn.CUDA_ALLOCATED, quiet.device_allocated_bytes)
                self._set(mn.QUIET_POINT, quiet.device_allocated_bytes, {mn.LABEL_SOURCE: "device"})
        if details is None:
            return
        for name, value in ((mn.CUDA_RESERVED, details.device_reserved_bytes), (mn.CUDA_PEAK, details.device_peak_bytes)):
            if value is not None:
                self._set(name, value)
        for name, value in ((mn.GPU_MEMORY_USAGE, details.nvml_used_bytes), (mn.GPU_MEMORY_LIMIT, details.nvml_total_bytes), (mn.GPU_PROCESS_MEMORY, details.nvml_process_bytes)):
            if value is not None:
                self._set(name, value, {mn.LABEL_DEVICE: device})
        for name, total in ((mn.ALLOC_RETRIES, details.alloc_retries), (mn.OOMS, details.ooms)):
            if total is not None:
                self._add_to_total(name, total)

    def leak(self, source: str, alert: LeakAlert | None) -> None:
        """The detector's state for one source: suspected (1) with its rate, or clear (0)."""
        self._set(mn.LEAK_SUSPECTED, 1 if alert else 0, {mn.LABEL_SOURCE: source})
        self._set(mn.LEAK_BYTES_PER_STEP, alert.bytes_per_step if alert else 0, {mn.LABEL_SOURCE: source})

    def expected_kv(self, bytes_per_token: int) -> None:
        self._set(mn.KV_EXPECTED, bytes_per_token)

    def spans_dropped(self, total: int) -> None:
        self._add_to_total(mn.SPANS_DROPPED, total)

    # -- helpers ----------------------------------------------------------------------------------

    def _observe(self, name: mn.MetricName, value: float, labels: dict[str, str], exemplar: dict[str, str] | None, ctx: Any) -> None:
        """Both sinks; the exemplar goes to Prometheus, the span context (`ctx`) to the SDK's
        exemplar filter (trace-based by default: recorded in a sampled span's context)."""
        self._prom[name.otel].labels(model=self.model, **labels).observe(value, exemplar)
        self._otel[name.otel].record(value, {mn.LABEL_MODEL: self.model, **labels}, context=ctx)

    def _set(self, name: mn.MetricName, value: float, labels: dict[str, str] | None = None) -> None:
        labels = labels or {}
        self._prom[name.otel].labels(model=self.model, **labels).set(value)
        self._otel[name.otel].set(value, {mn.LABEL_MODEL: self.model, **labels})

    def _add(self, name: mn.MetricName, amount: int) -> None:
        if amount:
            self._prom[name.otel].labels(model=self.model).inc(amount)
            self._otel[name.otel].add(amount, {mn.LABEL_MODEL: self.model})

    def _add_to_total(self, name: mn.MetricName, total: int) -> None:
        """Counters fed from a running total (allocator counts, dropped spans): add the increase."""
        increase = total - self._last_counts.get(name.otel, 0)
        self._last_counts[name.otel] = total
        if increase > 0:
            self._add(name, increase)


def exemplar_for(span_context: Any) -> tuple[dict[str, str] | None, Any]:
    """The exemplar and context for a span's context, or none for no (or an invalid) span."""
    if span_context is None or not span_context.is_valid:
        return None, None
    return _exemplar(span_context.trace_id, span_context.span_id)


def _exemplar(trace_id: int, span_id: int) -> tuple[dict[str, str], Any]:
    """The Prometheus exemplar labels and the OpenTelemetry context for one span."""
    labels = {"trace_id": f"{trace_id:032x}", "span_id": f"{span_id:016x}"}
    ctx = trace.set_span_in_context(NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))))
    return labels, ctx


def check_port_free(port: int, addr: str) -> None:
    """Fail early, before any model work, when the metrics port cannot be bound."""
    if not 0 <= port <= 65535:
        raise ConfigError("metrics_port", port, "a TCP port from 1 to 65535, or 0 for any free port")
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as probe:
        try:
            probe.bind((addr, port))
        except OSError as error:
            raise ConfigError("metrics_port", port, f"a port free on {addr} ({error.strerror}); choose another or 0 for any free port") from None


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1") -> tuple[Any, int]:
    """Serve `registry` on http://addr:port/metrics from a daemon thread; returns (server, port)."""
    check_port_free(port, addr)
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server, server.server_port


def _global_meter_provider() -> MeterProvider:
    from opentelemetry import metrics

    return metrics.get_meter_provider()
