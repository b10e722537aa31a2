"""Metrics over a real /metrics endpoint: names from tracedoffload/names.py, exemplars with trace ids,
absent device readings left unset, and a taken port refused before any work."""

from __future__ import annotations

import socket
import urllib.request

import pytest
import torch
from prometheus_client import CollectorRegistry

from tracedoffload import ConfigError, OffloadConfig, offload
from tracedoffload import names as mn
from tracedoffload.metrics import OffloadMetrics, check_port_free, serve_metrics
from tracedoffload.memory.monitor import MemoryMonitor
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import TracingSession
from tests.tracing.conftest import tiny_model

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def scrape(port: int) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": OPENMETRICS})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read().decode()


@pytest.fixture
def served_run():
    """A traced tiny-model generation recording metrics into a fresh registry served on loopback."""
    registry = CollectorRegistry()
    metrics = OffloadMetrics("tiny", registry=registry)
    server, port = serve_metrics(registry, 0)
    model = tiny_model()
    offloader = offload(model, OffloadConfig(num_layers_on_gpu=3))
    session = TracingSession([], policy=SamplingPolicy(level="token"))
    session.monitor_memory(MemoryMonitor(offloader, 1024, metrics=metrics))
    session.add_token_listener(
        lambda timing, stats: metrics.token(
            timing.duration_ns, "decode", timing.payload.trace_id, timing.payload.span_id,
            [(r.kind, e - s) for r, s, e in zip(timing.payload.records, timing.starts, timing.ends)], timing.sums["token.transfer_bytes"],
        )
    )
    session.attach(offloader)
    with torch.inference_mode(), session.generation("tiny", 5):
        model.generate(torch.arange(5).unsqueeze(0), max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    session.shutdown(5)
    offloader.detach()
    yield scrape(port), session
    server.shutdown()
    server.server_close()


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
    def test_cpu_series_are_recorded_with_the_run_s_values(self, served_run):
        """Every metric a CPU run records holds that run's values under its names.py name, not
        only a registered name: 5 tokens counted and observed, bytes copied, memory read."""
        text, session = served_run
        found = samples(text)
        stats = session.snapshot()
        assert value(found, mn.TOKENS.prometheus) == 5
        assert value(found, mn.TOKEN_LATENCY.prometheus + "_count") == 5
        assert value(found, mn.TIME_PER_OUTPUT_TOKEN.prometheus + "_count") == 5
        assert value(found, mn.BYTES_COPIED.prometheus) == stats["bytes_transferred"] > 0
        # One copy per offloaded layer per token, and on the first token an on-demand load while
        # the execution order is learned.
        assert 5 * stats["cpu_layers"] <= value(found, mn.LAYER_TRANSFER.prometheus + "_count") <= 6 * stats["cpu_layers"]
        assert value(found, mn.LAYER_COMPUTE.prometheus + "_count") == 5 * (stats["cpu_layers"] + stats["gpu_layers"])
        assert value(found, mn.PROCESS_RSS.prometheus) > 0
        assert value(found, mn.PINNED_HOST.prometheus) == 0  # no pinning on a CPU device
        assert value(found, mn.QUIET_POINT.prometheus, source="host") > 0
        assert value(found, mn.LEAK_SUSPECTED.prometheus, source="host") == 0
        assert value(found, mn.KV_EXPECTED.prometheus) == 1024

    def test_latency_buckets_carry_trace_id_exemplars(self, served_run):
        """Token latency buckets carry exemplars whose trace_id is one of the run's token traces."""
        text, session = served_run
        exemplar_lines = [line for line in text.splitlines() if line.startswith(mn.TOKEN_LATENCY.prometheus + "_bucket") and "trace_id" in line]
        assert exemplar_lines
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
    def test_token_latency_reaches_the_otel_sdk_with_a_trace_exemplar(self):
        """The same recording reaches OpenTelemetry instruments, the latency with the token's trace id as exemplar."""
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        reader = InMemoryMetricReader()
        metrics = OffloadMetrics("tiny", registry=CollectorRegistry(), meter_provider=MeterProvider(metric_readers=[reader]))
        trace_id, span_id = 0x1234567890ABCDEF1234567890ABCDEF, 0x1122334455667788
        metrics.token(20_000_000, "decode", trace_id, span_id, [("transfer", 300_000), ("compute", 900_000)], 4096)
        found = {
            m.name: m
            for rm in reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        }
        assert {mn.TOKEN_LATENCY.otel, mn.LAYER_TRANSFER.otel, mn.LAYER_COMPUTE.otel, mn.BYTES_COPIED.otel} <= set(found)
        point = found[mn.TOKEN_LATENCY.otel].data.data_points[0]
        assert point.sum == 0.02
        assert any(e.trace_id == trace_id for e in point.exemplars)


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
            assert value(found, mn.TOKENS.prometheus) == 4
        finally:
            process.kill()
            process.wait(30)
