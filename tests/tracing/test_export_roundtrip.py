"""A traced generation exported for real: the file gives back the same statistics, and a
collector that is down costs the generation nothing."""

from __future__ import annotations

import time

from tests.servers import free_port
from tracedoffload import names
from tracedoffload.tracing.exporters.jsonl import OtlpJsonLinesExporter, read_otlp_jsonl
from tracedoffload.tracing.exporters.otlp import otlp_span_exporter
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import TracingSession
from tracedoffload.tracing.stats import stats_from_spans

from .conftest import traced_generation


def comparable(stats):
    """The statistics without the counters that only the live session knows."""
    return {k: v for k, v in stats.items() if k not in ("dropped_spans", "dropped_steps", "telemetry_errors")}


class TestFileRoundTrip:
    def test_same_statistics_from_the_exported_file(self, tmp_path):
        """Stats recomputed from the OTLP JSON-lines file equal the live statistics, field by field."""
        path = tmp_path / "run.otlp.jsonl"
        session = TracingSession([OtlpJsonLinesExporter(path)], policy=SamplingPolicy.full_detail())
        traced_generation(session, generations=2).detach()
        assert session.shutdown(10)
        live = comparable(session.snapshot())
        from_file = stats_from_spans(read_otlp_jsonl(path))
        assert from_file["dropped_spans"] is None  # a file cannot hold what never reached it
        assert comparable(from_file) == live
        assert live["steps"] == 12 and live["generations"] == 2

    def test_sampled_file_keeps_the_totals(self, tmp_path):
        """With the default tail rule the file lacks most layer spans, yet its totals equal the live ones."""
        path = tmp_path / "run.otlp.jsonl"
        session = TracingSession([OtlpJsonLinesExporter(path)], policy=SamplingPolicy(first_tokens=1, every_n=1000, relative_to_p95=None))
        traced_generation(session, new_tokens=8).detach()
        session.shutdown(10)
        live, from_file = session.snapshot(), stats_from_spans(read_otlp_jsonl(path))
        assert from_file["time_breakdown"] == live["time_breakdown"]
        assert from_file["step_latency_ms"] == live["step_latency_ms"]
        assert from_file["slowest_steps"] == live["slowest_steps"]
        spans = list(read_otlp_jsonl(path))
        assert sum(1 for s in spans if s.name == names.SPAN_COMPUTE) < live["steps"] * 6


class TestCollectorDown:
    def test_otlp_to_a_closed_port_completes_and_counts_drops(self):
        """OTLP gRPC pointed at a closed loopback port: the generation completes and every lost span is counted."""
        exporter = otlp_span_exporter(f"http://127.0.0.1:{free_port()}", "grpc", timeout_s=1)
        session = TracingSession([exporter], policy=SamplingPolicy.full_detail())
        started = time.monotonic()
        traced_generation(session, flush=False).detach()
        generated = time.monotonic() - started
        session.shutdown(timeout_s=3)
        stats = session.snapshot()
        assert stats["steps"] == 6
        assert stats["dropped_spans"] > 0
        assert generated < 5

    def test_otlp_http_to_a_closed_port_counts_drops(self):
        """The same over OTLP/HTTP: nothing raises into the model and drops are counted."""
        exporter = otlp_span_exporter(f"http://127.0.0.1:{free_port()}", "http/protobuf", timeout_s=1)
        session = TracingSession([exporter], policy=SamplingPolicy(level="token"))
        traced_generation(session, flush=False).detach()
        session.shutdown(timeout_s=3)
        assert session.snapshot()["dropped_spans"] > 0
