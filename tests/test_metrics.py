"""Metrics over a real /metrics endpoint: names from tracedoffload/names.py, exemplars with trace ids,
absent device readings left unset, and a taken port refused before any work."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

from tracedoffload import ConfigError, OffloadConfig, offload
from tracedoffload import names as mn
from tracedoffload.metrics import OffloadMetrics, check_port_free, serve_metrics
from tracedoffload.memory.monitor import MemoryMonitor
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import TracingSession
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from tests.tracing.conftest import tiny_model

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def scrape(port: int) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": OPENMETRICS})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read().decode()


class FailingExporter(SpanExporter):
    """An exporter whose every export fails: the only way to make spans drop on purpose."""

    def export(self, spans):
        return SpanExportResult.FAILURE

    def shutdown(self):
        pass


def metered_generation(metrics: OffloadMetrics, new_tokens: int, exporters: list | None = None, kv_bytes_per_token: int | None = None):
    """One traced generation of the tiny model (a 5-token prompt), recorded by `metrics`; with
    `kv_bytes_per_token`, memory monitored too. Returns the shut-down session and the handle."""
    model = tiny_model()
    offloader = offload(model, OffloadConfig(num_layers_on_gpu=3))
    session = TracingSession(exporters or [], policy=SamplingPolicy(level="token"))
    if kv_bytes_per_token is not None:
        session.monitor_memory(MemoryMonitor(offloader, kv_bytes_per_token, metrics=metrics))
    metrics.subscribe(session)
    session.attach(offloader)
    with torch.inference_mode(), session.generation("tiny", 5) as handle:
        model.generate(torch.arange(5).unsqueeze(0), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        handle.output_tokens = new_tokens
    session.shutdown(5)
    offloader.detach()
    return session, handle


@pytest.fixture(scope="module")
def served_run():
    """A traced tiny-model generation (5 new tokens, one generation) recording metrics into a
    fresh registry served on loopback, its spans sent to an exporter that fails."""
    registry = CollectorRegistry()
    metrics = OffloadMetrics("tiny", registry=registry)
    server, port = serve_metrics(registry, 0)
    session, _ = metered_generation(metrics, 5, [FailingExporter()], kv_bytes_per_token=1024)
    metrics.spans_dropped(session.dropped_spans)  # as a run does at its end
    yield scrape(port), session
    server.shutdown()
    server.server_close()


# What a CPU run records, metric by metric: each must hold the run's values. The rest cannot be
# read without a GPU (absent, never a fake 0: see test_device_readings_are_absent_not_zero_on_cpu).
def expected_on_cpu(stats: dict) -> dict:
    return {
        mn.STEPS: [((), 5)],
        mn.GENERATED_TOKENS: [((), 5)],
        mn.STEP_LATENCY: [(("_count", {"phase": "prefill"}), 1), (("_count", {"phase": "decode"}), 4)],
        mn.TIME_TO_FIRST_TOKEN: [(("_count",), 1)],
        mn.TIME_PER_OUTPUT_TOKEN: [(("_count",), 1)],
        mn.REQUEST_DURATION: [(("_count",), 1)],
        mn.BYTES_COPIED: [((), stats["bytes_transferred"])],
        mn.LAYER_TRANSFER: [(("_count",), lambda n: 5 * stats["cpu_layers"] <= n <= 6 * stats["cpu_layers"])],
        mn.LAYER_COMPUTE: [(("_count",), 5 * (stats["cpu_layers"] + stats["gpu_layers"]))],
        mn.SPANS_DROPPED: [((), lambda n: n == stats["dropped_spans"] > 0)],
        mn.PROCESS_RSS: [((), lambda n: n > 0)],
        mn.PINNED_HOST: [((), 0)],  # no pinning on a CPU device
        mn.QUIET_POINT: [(("", {"source": "host"}), lambda n: n > 0)],
        mn.LEAK_SUSPECTED: [(("", {"source": "host"}), 0)],
        mn.LEAK_BYTES_PER_STEP: [(("", {"source": "host"}), 0)],
        mn.KV_TOKENS: [((), 9)],  # the 5-token prompt and the 4 tokens fed back after it
        # The first reading of a thread is its baseline; the steps after it are counted.
        mn.THREAD_CPU: [(("", {"thread": "model"}), lambda s: 0 < s), (("", {"thread": "telemetry"}), lambda s: 0 < s)],
        mn.KV_EXPECTED: [((), 1024)],
        # Batch 1: one sequence per step; the 5-token prompt, then one token per decode.
        mn.STEP_BATCH_SIZE: [(("_count",), 5), (("_sum",), 5)],
        mn.STEP_BATCH_TOKENS: [(("_count",), 5), (("_sum",), 9)],
        # No speculation in this run: at 0 (tests/test_speculation.py checks them with it).
        mn.DRAFTED_TOKENS: [((), 0)],
        mn.ACCEPTED_TOKENS: [((), 0)],
    }


# The server's own: recorded by `serve` only, each checked by tests/test_serve_production.py.
SERVER_ONLY = {
    mn.SERVER_QUEUE_DURATION, mn.SERVER_REQUESTS, mn.SERVER_REQUESTS_WAITING, mn.SERVER_REQUESTS_RUNNING,
    mn.SERVER_ENGINE_UP, mn.KV_CACHE_USAGE, mn.KV_CACHE_LIMIT,
}

NOT_ON_CPU = {
    mn.GPU_MEMORY_USAGE, mn.GPU_MEMORY_LIMIT, mn.GPU_PROCESS_MEMORY,  # NVML
    mn.CUDA_ALLOCATED, mn.CUDA_RESERVED, mn.CUDA_PEAK, mn.ALLOC_RETRIES, mn.OOMS,  # the CUDA caching allocator
}


def samples(text: str) -> dict[str, list]:
    """The exposition parsed: each sample name and its samples (labels, value)."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    found: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def value(found: dict[str, list], name: str, **labels: str) -> float:
    matching = [s.value for s in found.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert matching, f"{name} {labels} was never recorded"
    return sum(matching)


class TestExposition:
    def test_every_documented_metric_is_accounted_for(self):
        """Each metric of names.py is either checked below for a CPU run's values, checked by the
        server's tests, or listed as readable only with a GPU: a metric registered and never
        recorded cannot hide."""
        checked = set(expected_on_cpu({"bytes_transferred": 0, "cpu_layers": 0, "gpu_layers": 0, "dropped_spans": 0}))
        assert checked | SERVER_ONLY | NOT_ON_CPU == set(mn.ALL)
        assert not checked & NOT_ON_CPU and not checked & SERVER_ONLY and not SERVER_ONLY & NOT_ON_CPU

    def test_every_cpu_series_holds_the_run_s_values(self, served_run):
        """Every metric a CPU run records holds that run's values under its names.py name, sample
        by sample: 5 steps (1 prefill, 4 decode), 5 new tokens, one generation's duration, time
        to first token and time per output token, the bytes the spans counted, 9 KV tokens."""
        text, session = served_run
        found = samples(text)
        stats = session.snapshot()
        for metric, checks in expected_on_cpu(stats).items():
            for (suffix_and_labels, expected) in checks:
                suffix = suffix_and_labels[0] if suffix_and_labels else ""
                labels = suffix_and_labels[1] if len(suffix_and_labels) > 1 else {}
                got = value(found, metric.prometheus + suffix, **labels)
                assert expected(got) if callable(expected) else got == expected, (metric.prometheus + suffix, labels, got)
        assert stats["bytes_transferred"] > 0

    def test_latency_buckets_carry_trace_id_exemplars(self, served_run):
        """Step latency buckets carry exemplars whose trace_id is one of the run's step traces; the
        request's latencies carry its generation's trace id."""
        text, session = served_run
        for metric in (mn.STEP_LATENCY, mn.REQUEST_DURATION, mn.TIME_TO_FIRST_TOKEN):
            exemplar_lines = [line for line in text.splitlines() if line.startswith(metric.prometheus + "_bucket") and "trace_id" in line]
            assert exemplar_lines, metric.prometheus
            trace_id = exemplar_lines[0].split('trace_id="')[1][:32]
            assert len(trace_id) == 32 and int(trace_id, 16) > 0

    def test_device_readings_are_absent_not_zero_on_cpu(self, served_run):
        """Without a GPU the device memory series are not exposed at all (no fake zeros)."""
        text, _ = served_run
        for name in (mn.GPU_MEMORY_USAGE, mn.CUDA_RESERVED, mn.CUDA_ALLOCATED):
            assert not any(line.startswith(name.prometheus + "{") for line in text.splitlines())
        assert f'{mn.QUIET_POINT.prometheus}{{model="tiny",source="device"}}' not in text

    def test_layer_histograms_have_sub_millisecond_buckets(self, served_run):
        """Layer transfer and compute histograms resolve below a millisecond."""
        text, _ = served_run
        assert f'{mn.LAYER_TRANSFER.prometheus}_bucket{{le="0.0001",model="tiny"}}' in text


class TestPort:
    def test_a_taken_port_is_refused_with_the_field_named(self):
        """Binding a port already in use raises ConfigError naming metrics_port."""
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            with pytest.raises(ConfigError, match="metrics_port"):
                check_port_free(port, "127.0.0.1")

    def test_out_of_range_port_is_refused(self):
        """A port above 65535 is refused."""
        with pytest.raises(ConfigError, match="metrics_port"):
            check_port_free(70000, "127.0.0.1")


class TestOpenTelemetryInstruments:
    def test_a_traced_run_reaches_the_otel_sdk_with_trace_exemplars(self):
        """The same recording reaches OpenTelemetry instruments: step latency with the step's
        trace id as exemplar, the request's duration with its generation's."""
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        reader = InMemoryMetricReader()
        metrics = OffloadMetrics("tiny", registry=CollectorRegistry(), meter_provider=MeterProvider(metric_readers=[reader]))
        _, handle = metered_generation(metrics, 3)
        found = {m.name: m for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
        assert {mn.STEP_LATENCY.otel, mn.LAYER_TRANSFER.otel, mn.LAYER_COMPUTE.otel, mn.BYTES_COPIED.otel, mn.REQUEST_DURATION.otel} <= set(found)
        steps = found[mn.STEP_LATENCY.otel].data.data_points
        assert sum(p.count for p in steps) == 3
        assert all(p.exemplars and p.exemplars[0].trace_id for p in steps)
        (request,) = found[mn.REQUEST_DURATION.otel].data.data_points
        assert request.count == 1 and request.exemplars[0].trace_id == handle.span_context.trace_id


class TestRunCommandMetrics:
    def test_a_run_records_its_generation_duration(self):
        """`run --metrics-port` records the generation's duration (gen_ai.server.request.duration),
        documented and once never recorded, next to its tokens."""
        import subprocess
        import sys
        import time

        from tests.servers import free_port

        port = free_port()
        command = [sys.executable, "-m", "tracedoffload", "run", "--model", "random", "--max-new-tokens", "4", "--no-trace-file",
                   "--no-progress", "--metrics-port", str(port), "--metrics-linger", "60"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 240
            while True:
                assert process.poll() is None and time.monotonic() < deadline, "the run ended before its duration was served"
                try:
                    found = samples(scrape(port))
                except OSError:
                    found = {}
                if found.get(mn.REQUEST_DURATION.prometheus + "_count"):
                    break
                time.sleep(0.2)
            assert value(found, mn.REQUEST_DURATION.prometheus + "_count") == 1
            assert value(found, mn.REQUEST_DURATION.prometheus + "_sum") > 0
            assert value(found, mn.GENERATED_TOKENS.prometheus) == 4
        finally:
            process.kill()
            process.wait(30)


def test_dropped_spans_are_counted_while_running_not_only_at_the_end():
    """A server runs for days: spans lost to a failing exporter show on the counter while the
    session still runs (read at most once a second, from the steps' listener)."""
    registry = CollectorRegistry()
    metrics = OffloadMetrics("tiny", registry=registry)
    model = tiny_model()
    offloader = offload(model, OffloadConfig(num_layers_on_gpu=3))
    session = TracingSession([FailingExporter()], policy=SamplingPolicy(level="token"))
    metrics.subscribe(session)
    session.attach(offloader)
    counter = mn.SPANS_DROPPED.prometheus
    try:
        deadline = time.monotonic() + 60
        while value(samples(openmetrics(registry).decode()), counter) == 0:
            assert time.monotonic() < deadline, "no dropped span was ever counted while running"
            with torch.inference_mode(), session.generation("tiny", 5) as handle:
                model.generate(torch.arange(5).unsqueeze(0), max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
                handle.output_tokens = 2
            session.drain(10)
            time.sleep(0.2)
    finally:
        session.shutdown(5)
        offloader.detach()
