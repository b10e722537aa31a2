"""Tests for tracedoffload.tracing.exporters: OTLP/JSON lines, Perfetto, OTLP and counting exporters."""

from __future__ import annotations

import http.server
import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcOTLPSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpOTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from tests.logcapture import capture_logs

from tests.servers import free_port
from tracedoffload._exceptions import ConfigError
from tracedoffload import names
from tracedoffload.tracing.exporters import (
    CountingExporter,
    ExportCounts,
    OtlpJsonLinesExporter,
    PerfettoExporter,
    check_otlp_settings,
    encode_otlp_json,
    otlp_requested,
    otlp_span_exporter,
    read_otlp_jsonl,
)
from tracedoffload.tracing.spanview import SpanView

from .otlp_protobuf import parse_as_protobuf

MODEL = "tiny-model"
GENERATION_SPAN = f"{names.GEN_AI_OPERATION} {MODEL}"


# -- helpers -------------------------------------------------------------------------------------------


def _provider(*exporters: SpanExporter, resource: Resource | None = None) -> TracerProvider:
    provider = TracerProvider(resource=resource or Resource.create({"service.name": "tracedoffload-test"}))
    for exporter in exporters:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def _generate(provider: TracerProvider, tokens: int = 2, layers: int = 2) -> None:
    """One generation span, token spans under it, and a transfer/compute/release per layer and token."""
    tracer = provider.get_tracer("tracedoffload", "0.1.0")
    t0 = 1_700_000_000_000_000_000
    step = 1_000_000
    generation = tracer.start_span(
        GENERATION_SPAN,
        kind=SpanKind.CLIENT,
        start_time=t0,
        attributes={
            names.GEN_AI_OPERATION_NAME: names.GEN_AI_OPERATION,
            names.GEN_AI_REQUEST_MODEL: MODEL,
            names.GEN_AI_RESPONSE_FINISH_REASONS: ("length",),
            names.OFFLOAD_CPU_LAYERS: (0, 1),
        },
    )
    from opentelemetry import trace

    previous = None
    with trace.use_span(generation, end_on_exit=False):
        for token in range(tokens):
            begin = t0 + 10 * step * token + step
            links = [Link(previous.get_span_context(), {"link.kind": "previous_token"})] if previous else []
            span = tracer.start_span(
                names.SPAN_STEP,
                start_time=begin,
                links=links,
                attributes={
                    names.STEP_INDEX: token,
                    names.STEP_PHASE: names.PHASE_PREFILL if token == 0 else names.PHASE_DECODE,
                    names.STEP_LAYER_DETAIL: True,
                    names.STEP_COMPUTE_NS: 1234567,
                    "token.ratio": 0.25,
                },
            )
            span.add_event(names.EVENT_SLOW_STEP, {"threshold_ns": 5_000_000, "why": "slow"}, timestamp=begin + 7)
            with trace.use_span(span, end_on_exit=False):
                for layer in range(layers):
                    base = begin + 3 * layer * 1000  # the first transfer starts with its token
                    for offset, name in enumerate((names.SPAN_TRANSFER, names.SPAN_COMPUTE, names.SPAN_RELEASE)):
                        child = tracer.start_span(
                            name,
                            start_time=base + offset * 1000,
                            attributes={
                                names.LAYER_INDEX: layer,
                                names.LAYER_OFFLOADED: True,
                                names.LAYER_BYTES: 123_456_789,
                                names.LAYER_GBPS: 12.5,
                                names.LAYER_STREAM: "copy" if name == names.SPAN_TRANSFER else "compute",
                            },
                        )
                        child.end(end_time=base + offset * 1000 + 777)
            if token == tokens - 1:
                span.set_status(Status(StatusCode.ERROR, "stopped: max tokens"))
            span.end(end_time=begin + 9 * step)
            previous = span
    generation.end(end_time=t0 + 10 * step * tokens + step)


def _spans(tokens: int = 2, layers: int = 2) -> tuple[ReadableSpan, ...]:
    memory = InMemorySpanExporter()
    _generate(_provider(memory), tokens, layers)
    return memory.get_finished_spans()


def _readable(
    name: str,
    *,
    trace_id: int = 0x0AF7651916CD43DD8448EB211C80319C,
    span_id: int = 0x00F067AA0BA902B7,
    parent: SpanContext | None = None,
    resource: Resource | None = None,
    scope: InstrumentationScope | None = None,
    trace_state: TraceState | None = None,
    attributes: dict[str, Any] | None = None,
    events: Sequence[Event] = (),
    links: Sequence[Link] = (),
    kind: SpanKind = SpanKind.INTERNAL,
    status: Status | None = None,
) -> ReadableSpan:
    context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(1), trace_state=trace_state)
    return ReadableSpan(
        name,
        context=context,
        parent=parent,
        resource=resource or Resource({"service.name": "direct"}),
        attributes=attributes,
        events=events,
        links=links,
        kind=kind,
        status=status or Status(StatusCode.UNSET),
        start_time=1_000,
        end_time=2_500,
        instrumentation_scope=scope,
    )


class _GrpcCollector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.metadata: list[dict[str, str]] = []

    def Export(self, request: ExportTraceServiceRequest, context: Any) -> Any:  # noqa: N802 (gRPC method name)
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def grpc_collector() -> Iterator[tuple[_GrpcCollector, int]]:
    collector = _GrpcCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collector, port
    server.stop(grace=None)


class _HttpCollector(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], ExportTraceServiceRequest]] = []
        super().__init__(("127.0.0.1", 0), _HttpCollectorHandler)


class _HttpCollectorHandler(http.server.BaseHTTPRequestHandler):
    server: _HttpCollector

    def do_POST(self) -> None:  # noqa: N802 (http.server's method name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest.FromString(body)
        self.server.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, request))
        payload = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        pass


@pytest.fixture
def http_collector() -> Iterator[_HttpCollector]:
    server = _HttpCollector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# -- OTLP/JSON lines ------------------------------------------------------------------------------------------


class TestOtlpJsonLinesExporter:
    def test_round_trip_matches_spanview_from_readable(self, tmp_path: Path) -> None:
        """Spans written through a real provider read back equal to SpanView.from_readable of the same spans."""
        path = tmp_path / "trace.jsonl"
        memory = InMemorySpanExporter()
        exporter = OtlpJsonLinesExporter(path)
        provider = _provider(exporter, memory)
        _generate(provider)
        provider.shutdown()
        expected = [SpanView.from_readable(span) for span in memory.get_finished_spans()]
        got = list(read_otlp_jsonl(path))
        assert got == expected
        token = next(view for view in got if view.name == names.SPAN_STEP and view.links)
        assert isinstance(token.attributes[names.STEP_INDEX], int)
        assert token.attributes["token.ratio"] == 0.25
        assert token.attributes[names.STEP_LAYER_DETAIL] is True
        generation = next(view for view in got if view.name == GENERATION_SPAN)
        assert generation.attributes[names.OFFLOAD_CPU_LAYERS] == (0, 1)
        assert generation.parent_span_id is None

    def test_each_line_parses_as_the_sdk_protobuf_request(self, tmp_path: Path) -> None:
        """Every line is accepted by protobuf's JSON parser and equals encode_spans of that export's spans."""
        path = tmp_path / "trace.jsonl"
        memory = InMemorySpanExporter()
        provider = _provider(OtlpJsonLinesExporter(path), memory)
        _generate(provider)
        provider.shutdown()
        lines = path.read_text().splitlines()
        spans = memory.get_finished_spans()
        assert len(lines) == len(spans)  # SimpleSpanProcessor exports one span per call
        for line, span in zip(lines, spans, strict=True):
            assert parse_as_protobuf(line) == encode_spans([span])

    def test_a_mixed_batch_groups_like_the_sdk_encoder(self, tmp_path: Path) -> None:
        """A batch mixing resources, scopes, kinds, trace state, remote parents, events, links and statuses encodes as encode_spans does."""
        resource_a = Resource({"service.name": "a", "host.cores": 2}, schema_url="https://opentelemetry.io/schemas/1.26.0")
        resource_b = Resource({"service.name": "b"})
        scope_x = InstrumentationScope("x", "1.0", "https://example.com/x", {"scope.attr": True})
        scope_y = InstrumentationScope("y")
        remote_parent = SpanContext(0x1, 0x2, is_remote=True)
        linked = SpanContext(0xABC, 0xDEF, is_remote=False)
        spans = [
            _readable("a-x-1", resource=resource_a, scope=scope_x, attributes={"s": "é\"\n", "n": -3, "f": 1e300}),
            _readable("b-y-1", span_id=0x10, resource=resource_b, scope=scope_y, parent=remote_parent, kind=SpanKind.SERVER),
            _readable(
                "a-x-2",
                span_id=0x11,
                resource=resource_a,
                scope=scope_x,
                trace_state=TraceState([("vendor", "v1"), ("other", "o")]),
                events=[Event("e", {"k": (1, 2)}, timestamp=1_200)],
                links=[Link(linked, {"why": "batch"})],
                status=Status(StatusCode.ERROR, "boom"),
            ),
            _readable("a-none", span_id=0x12, resource=resource_a, scope=None, status=Status(StatusCode.OK)),
            _readable("a-y", span_id=0x13, resource=resource_a, scope=scope_y, kind=SpanKind.CONSUMER,
                      attributes={"flags": (True, False), "words": ("a", "b"), "floats": (0.5, 2.0), "ints": (7, -1), "none": ()}),
        ]
        line = encode_otlp_json(spans)
        assert "\n" not in line
        parsed = parse_as_protobuf(line)
        assert parsed == encode_spans(spans)
        assert [len(rs.scope_spans) for rs in parsed.resource_spans] == [3, 1]

    def test_ids_times_and_values_use_the_otlp_json_encoding(self) -> None:
        """Ids are lowercase hex, times and ints are decimal strings, doubles numbers, kind an integer."""
        parent = SpanContext(0x1, 0xBEEF, is_remote=False)
        span = _readable("s", parent=parent, attributes={"i": 123, "d": 1.5, "b": True, "a": (1, 2)}, kind=SpanKind.CLIENT)
        request = json.loads(encode_otlp_json([span]))
        encoded = request["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
        assert encoded["traceId"] == "0af7651916cd43dd8448eb211c80319c"
        assert encoded["spanId"] == "00f067aa0ba902b7"
        assert encoded["parentSpanId"] == "000000000000beef"
        assert encoded["startTimeUnixNano"] == "1000" and encoded["endTimeUnixNano"] == "2500"
        assert encoded["kind"] == 3
        values = {kv["key"]: kv["value"] for kv in encoded["attributes"]}
        assert values == {
            "i": {"intValue": "123"},
            "d": {"doubleValue": 1.5},
            "b": {"boolValue": True},
            "a": {"arrayValue": {"values": [{"intValue": "1"}, {"intValue": "2"}]}},
        }

    def test_non_finite_doubles_are_valid_json_strings(self, tmp_path: Path) -> None:
        """NaN and infinities are written as proto3 JSON strings, parsed by protobuf and read back as floats."""
        span = _readable("s", attributes={"nan": math.nan, "inf": math.inf, "ninf": -math.inf})
        line = encode_otlp_json([span])
        json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
        parsed = parse_as_protobuf(line)
        values = {kv.key: kv.value.double_value for kv in parsed.resource_spans[0].scope_spans[0].spans[0].attributes}
        assert math.isnan(values["nan"]) and values["inf"] == math.inf and values["ninf"] == -math.inf
        path = tmp_path / "t.jsonl"
        path.write_text(line + "\n")
        (view,) = read_otlp_jsonl(path)
        assert math.isnan(view.attributes["nan"]) and view.attributes["ninf"] == -math.inf

    def test_one_line_per_export_and_append_keeps_earlier_lines(self, tmp_path: Path) -> None:
        """Each export call is one line; a second exporter appends by default and truncates with append=False."""
        path = tmp_path / "sub" / "trace.jsonl"
        spans = _spans()
        first = OtlpJsonLinesExporter(path)
        assert first.export(spans) is SpanExportResult.SUCCESS
        assert first.export(spans[:3]) is SpanExportResult.SUCCESS
        first.shutdown()
        assert len(path.read_text().splitlines()) == 2
        second = OtlpJsonLinesExporter(path)
        second.export(spans[:1])
        second.shutdown()
        assert len(path.read_text().splitlines()) == 3
        assert len(list(read_otlp_jsonl(path))) == len(spans) + 3 + 1
        third = OtlpJsonLinesExporter(path, append=False)
        third.export(spans[:2])
        third.shutdown()
        assert len(list(read_otlp_jsonl(path))) == 2

    def test_write_failure_returns_failure_and_logs_once(self) -> None:
        """A full disk (/dev/full) makes export return FAILURE without raising, logged once per run of failures."""
        if not os.path.exists("/dev/full"):
            pytest.skip("needs /dev/full")
        exporter = OtlpJsonLinesExporter("/dev/full")
        spans = _spans(tokens=1, layers=1)
        with capture_logs() as logs:
            assert exporter.export(spans) is SpanExportResult.FAILURE
            assert exporter.export(spans) is SpanExportResult.FAILURE
        exporter.shutdown()
        assert exporter.failures == 2
        assert [entry["event"] for entry in logs] == ["otlp_jsonl.write_failed"]

    def test_export_after_shutdown_fails_and_shutdown_is_idempotent(self, tmp_path: Path) -> None:
        """After shutdown export returns FAILURE, and a second shutdown is a no-op."""
        exporter = OtlpJsonLinesExporter(tmp_path / "t.jsonl")
        exporter.shutdown()
        exporter.shutdown()
        assert exporter.export(_spans(1, 1)) is SpanExportResult.FAILURE
        assert exporter.force_flush() is True

    def test_concurrent_exports_never_interleave_lines(self, tmp_path: Path) -> None:
        """Exports from several threads at once leave one valid JSON line per call."""
        path = tmp_path / "t.jsonl"
        exporter = OtlpJsonLinesExporter(path)
        spans = _spans(tokens=2, layers=3)
        start = threading.Barrier(4)

        def worker() -> None:
            start.wait()
            for _ in range(25):
                assert exporter.export(spans) is SpanExportResult.SUCCESS

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        exporter.shutdown()
        lines = path.read_text().splitlines()
        assert len(lines) == 100
        assert all(json.loads(line)["resourceSpans"] for line in lines)
        assert len(list(read_otlp_jsonl(path))) == 100 * len(spans)


class TestReadOtlpJsonl:
    def test_reads_collector_file_exporter_output(self, tmp_path: Path) -> None:
        """A line as the Collector's file exporter writes it (empty parentSpanId, numeric doubles, kvlists) is read."""
        line = {
            "resourceSpans": [
                {
                    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
                    "scopeSpans": [
                        {
                            "scope": {"name": "tracedoffload"},
                            "spans": [
                                {
                                    "traceId": "5b8efff798038103d269b633813fc60c",
                                    "spanId": "eee19b7ec3c1b174",
                                    "parentSpanId": "",
                                    "flags": 256,
                                    "name": "token",
                                    "kind": 1,
                                    "startTimeUnixNano": "1544712660000000000",
                                    "endTimeUnixNano": "1544712661000000000",
                                    "attributes": [
                                        {"key": "token.index", "value": {"intValue": "7"}},
                                        {"key": "ratio", "value": {"doubleValue": 3}},
                                        {"key": "ok", "value": {"boolValue": True}},
                                        {"key": "tags", "value": {"arrayValue": {"values": [{"stringValue": "a"}]}}},
                                        {"key": "empty", "value": {"arrayValue": {}}},
                                        {"key": "map", "value": {"kvlistValue": {"values": [{"key": "k", "value": {"intValue": 1}}]}}},
                                        {"key": "raw", "value": {"bytesValue": "AQI="}},
                                    ],
                                    "links": [{"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "0000000000000001"}],
                                    "status": {},
                                },
                                {
                                    "traceId": "5b8efff798038103d269b633813fc60c",
                                    "spanId": "0000000000000002",
                                    "parentSpanId": "eee19b7ec3c1b174",
                                    "name": "layer.compute",
                                    "kind": 1,
                                    "startTimeUnixNano": "1544712660000000100",
                                    "endTimeUnixNano": "1544712660000000900",
                                    "status": {"code": 2, "message": "x"},
                                },
                            ],
                        }
                    ],
                }
            ]
        }
        path = tmp_path / "collector.json"
        path.write_text(json.dumps(line) + "\n\n")
        token, compute = read_otlp_jsonl(path)
        assert token == SpanView(
            name="token",
            trace_id=0x5B8EFFF798038103D269B633813FC60C,
            span_id=0xEEE19B7EC3C1B174,
            parent_span_id=None,
            start_ns=1544712660000000000,
            end_ns=1544712661000000000,
            attributes={
                "token.index": 7,
                "ratio": 3.0,
                "ok": True,
                "tags": ("a",),
                "empty": (),
                "map": {"k": 1},
                "raw": b"\x01\x02",
            },
            links=((0x5B8EFFF798038103D269B633813FC60C, 1),),
        )
        assert isinstance(token.attributes["ratio"], float)
        assert compute.parent_span_id == token.span_id and compute.duration_ns == 800 and compute.attributes == {}

    def test_reads_protobuf_json_with_base64_ids(self, tmp_path: Path) -> None:
        """Lines from protobuf's own JSON printer (base64 ids) read back as the same spans."""
        spans = _spans()
        path = tmp_path / "proto.jsonl"
        path.write_text(json.dumps(json_format.MessageToDict(encode_spans(spans))) + "\n")
        assert list(read_otlp_jsonl(path)) == [SpanView.from_readable(span) for span in spans]

    def test_malformed_line_raises_value_error_naming_the_line(self, tmp_path: Path) -> None:
        """A line that is not JSON raises ValueError naming file and line number."""
        path = tmp_path / "bad.jsonl"
        path.write_text(encode_otlp_json(_spans(1, 1)) + "\n" + '{"resourceSpans": [\n')
        with pytest.raises(ValueError, match=r"bad\.jsonl:2:"):
            list(read_otlp_jsonl(path))


# -- Perfetto ------------------------------------------------------------------------------------------------


def _perfetto_trace(tmp_path: Path, tokens: int = 2, layers: int = 2) -> tuple[dict[str, Any], list[ReadableSpan]]:
    path = tmp_path / "trace.json"
    memory = InMemorySpanExporter()
    provider = _provider(PerfettoExporter(path), memory)
    _generate(provider, tokens, layers)
    provider.shutdown()
    with open(path) as file:
        return json.load(file), list(memory.get_finished_spans())


class TestPerfettoExporter:
    def test_tracks_are_named_threads_of_one_process(self, tmp_path: Path) -> None:
        """The file names the process and one thread per track, and each span sits on its track."""
        trace, spans = _perfetto_trace(tmp_path)
        assert trace["displayTimeUnit"] == "ms"
        meta = [e for e in trace["traceEvents"] if e["ph"] == "M"]
        assert {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "tracedoffload"}} in meta
        threads = {e["args"]["name"]: e["tid"] for e in meta if e["name"] == "thread_name"}
        assert set(threads) == {"generation", "steps", "transfers", "compute", "releases"}
        assert len(set(threads.values())) == 5
        expected_track = {
            GENERATION_SPAN: "generation",
            names.SPAN_STEP: "steps",
            names.SPAN_TRANSFER: "transfers",
            names.SPAN_COMPUTE: "compute",
            names.SPAN_RELEASE: "releases",
        }
        complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
        assert len(complete) == len(spans)
        for event in complete:
            assert event["tid"] == threads[expected_track[event["name"]]]
            assert event["pid"] == 1

    def test_times_and_durations_match_the_spans(self, tmp_path: Path) -> None:
        """ts and dur are microseconds from the earliest span, exact to the nanosecond, and events are ordered."""
        trace, spans = _perfetto_trace(tmp_path)
        origin = min(span.start_time for span in spans)
        assert trace["otherData"]["origin_unix_ns"] == origin
        complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
        by_id = {f"{span.context.span_id:016x}": span for span in spans}
        for event in complete:
            span = by_id[event["args"]["span_id"]]
            assert isinstance(event["ts"], float) and isinstance(event["dur"], float)
            assert round(event["ts"] * 1000) == span.start_time - origin
            assert round(event["dur"] * 1000) == span.end_time - span.start_time
        assert [e["ts"] for e in complete] == sorted(e["ts"] for e in complete)
        for earlier, later in zip(complete, complete[1:]):
            if earlier["ts"] == later["ts"]:  # a parent and its first child: the parent first
                assert earlier["dur"] >= later["dur"]
        token = complete.index(next(e for e in complete if e["name"] == names.SPAN_STEP))
        assert complete[token + 1]["name"] == names.SPAN_TRANSFER
        assert complete[token + 1]["ts"] == complete[token]["ts"]

    def test_args_carry_attributes_and_ids(self, tmp_path: Path) -> None:
        """Each event's args hold the span's attributes plus its trace id in hex."""
        trace, spans = _perfetto_trace(tmp_path, tokens=1, layers=1)
        compute_span = next(span for span in spans if span.name == names.SPAN_COMPUTE)
        (event,) = [e for e in trace["traceEvents"] if e.get("name") == names.SPAN_COMPUTE]
        assert event["args"][names.LAYER_INDEX] == 0
        assert event["args"][names.LAYER_GBPS] == 12.5
        assert event["args"]["trace_id"] == f"{compute_span.context.trace_id:032x}"
        assert event["args"]["parent_span_id"] == f"{compute_span.parent.span_id:016x}"
        (generation,) = [e for e in trace["traceEvents"] if e.get("name") == GENERATION_SPAN]
        assert generation["args"][names.OFFLOAD_CPU_LAYERS] == [0, 1]

    def test_force_flush_writes_a_complete_file_each_time(self, tmp_path: Path) -> None:
        """force_flush leaves a loadable file with everything so far, and later flushes add the new spans."""
        path = tmp_path / "trace.json"
        exporter = PerfettoExporter(path)
        spans = _spans(1, 1)
        exporter.export(spans[:2])
        assert exporter.force_flush() is True
        assert len([e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]) == 2
        exporter.export(spans[2:])
        exporter.shutdown()
        assert len([e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]) == len(spans)
        assert exporter.export(spans) is SpanExportResult.FAILURE
        assert not path.with_name("trace.json.tmp").exists()

    def test_buffer_is_capped_and_overflow_counted(self, tmp_path: Path) -> None:
        """Past max_spans spans are dropped, counted, and reported in the file."""
        path = tmp_path / "trace.json"
        exporter = PerfettoExporter(path, max_spans=3)
        spans = _spans(1, 1)  # 5 spans
        with capture_logs() as logs:
            assert exporter.export(spans[:4]) is SpanExportResult.SUCCESS
            assert exporter.export(spans[4:]) is SpanExportResult.SUCCESS
        exporter.shutdown()
        assert exporter.dropped_spans == 2
        assert [entry["event"] for entry in logs] == ["perfetto.buffer_full"]
        trace = json.loads(path.read_text())
        assert len([e for e in trace["traceEvents"] if e["ph"] == "X"]) == 3
        assert trace["otherData"]["dropped_spans"] == 2

    def test_unknown_spans_go_to_an_other_track(self, tmp_path: Path) -> None:
        """A span with a name outside names.py lands on an 'other' track instead of being lost."""
        path = tmp_path / "trace.json"
        exporter = PerfettoExporter(path)
        exporter.export([_readable("custom", attributes={"bad": math.nan})])
        exporter.shutdown()
        trace = json.loads(path.read_text())
        threads = {e["args"]["name"]: e["tid"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
        (event,) = [e for e in trace["traceEvents"] if e["ph"] == "X"]
        assert event["tid"] == threads["other"]
        assert event["args"]["bad"] == "nan"

    def test_failed_write_returns_false_without_raising(self, tmp_path: Path) -> None:
        """When the path cannot be written (it is a directory), flush returns False and shutdown does not raise."""
        exporter = PerfettoExporter(tmp_path)
        exporter.export(_spans(1, 1))
        with capture_logs() as logs:
            assert exporter.force_flush() is False
            exporter.shutdown()
        assert logs and logs[0]["event"] == "perfetto.write_failed"

    def test_max_spans_must_be_positive(self, tmp_path: Path) -> None:
        """A cap below one is a ConfigError naming max_spans."""
        with pytest.raises(ConfigError) as caught:
            PerfettoExporter(tmp_path / "t.json", max_spans=0)
        assert caught.value.field == "max_spans"


# -- OTLP --------------------------------------------------------------------------------------------------


class TestOtlpSpanExporter:
    def test_default_protocol_is_grpc(self, clean_otel_env: pytest.MonkeyPatch) -> None:
        """With no argument and no environment the SDK's gRPC exporter is built."""
        exporter = otlp_span_exporter()
        assert isinstance(exporter, GrpcOTLPSpanExporter)
        exporter.shutdown()

    def test_protocol_from_environment_and_argument_precedence(self, clean_otel_env: pytest.MonkeyPatch) -> None:
        """The traces protocol variable beats the general one, and an argument beats both."""
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
        assert isinstance(otlp_span_exporter(), HttpOTLPSpanExporter)
        grpc_exporter = otlp_span_exporter(protocol="grpc")
        assert isinstance(grpc_exporter, GrpcOTLPSpanExporter)
        grpc_exporter.shutdown()

    @pytest.mark.parametrize("protocol", ["http/json", "thrift", "", "HTTP"])
    def test_unsupported_protocol_is_a_config_error(self, clean_otel_env: pytest.MonkeyPatch, protocol: str) -> None:
        """http/json (not in the Python SDK) and unknown protocols raise ConfigError naming otlp_protocol."""
        with pytest.raises(ConfigError, match="grpc or http/protobuf") as caught:
            otlp_span_exporter(protocol=protocol)
        assert caught.value.field == "otlp_protocol"
        assert caught.value.value == protocol

    def test_bad_protocol_from_environment_names_the_variable(self, clean_otel_env: pytest.MonkeyPatch) -> None:
        """A bad protocol in the environment fails at construction, and the message says where it came from."""
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
            otlp_span_exporter()

    @pytest.mark.parametrize("timeout_s", [0, -1.0, math.inf, "soon", True])
    def test_bad_timeout_is_a_config_error(self, clean_otel_env: pytest.MonkeyPatch, timeout_s: Any) -> None:
        """A timeout that is not a positive finite number of seconds raises ConfigError."""
        with pytest.raises(ConfigError) as caught:
            otlp_span_exporter(timeout_s=timeout_s)
        assert caught.value.field == "otlp_timeout_s"

    def test_bad_timeout_in_environment_names_the_variable(self, clean_otel_env: pytest.MonkeyPatch) -> None:
        """A malformed OTEL_EXPORTER_OTLP_TIMEOUT is a ConfigError naming that variable."""
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "ten")
        with pytest.raises(ConfigError) as caught:
            otlp_span_exporter()
        assert caught.value.field == "OTEL_EXPORTER_OTLP_TIMEOUT"

    def test_http_endpoint_must_be_a_url(self, clean_otel_env: pytest.MonkeyPatch) -> None:
        """For http/protobuf an endpoint without http(s) scheme is a ConfigError naming otlp_endpoint."""
        with pytest.raises(ConfigError) as caught:
            otlp_span_exporter("localhost:4318", "http/protobuf")
        assert caught.value.field == "otlp_endpoint"

    @pytest.mark.parametrize(
        "endpoint", ["notaurl", "ftp://collector:4317", "http://", "collector", "http://localhost:abc", "http://localhost:99999", "http://:4317", "localhost:0"]
    )
    def test_malformed_endpoint_in_environment_names_the_variable(self, clean_otel_env: pytest.MonkeyPatch, endpoint: str) -> None:
        """A malformed OTEL_EXPORTER_OTLP_ENDPOINT fails at setup, naming the variable, not at the first export."""
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        with pytest.raises(ConfigError) as caught:
            check_otlp_settings()
        assert caught.value.field == "OTEL_EXPORTER_OTLP_ENDPOINT"

    @pytest.mark.parametrize(
        "endpoint",
        ["localhost:4317", "10.0.0.7:4317", "[::1]:4317", "otel_collector:4317", "https://collector.example:443", "dns:///collector:4317", "unix:///run/otel.sock"],
    )
    def test_grpc_takes_a_url_or_host_and_port(self, clean_otel_env: pytest.MonkeyPatch, endpoint: str) -> None:
        """gRPC endpoints may be a URL or a bare host:port, from the argument or the environment."""
        check_otlp_settings(endpoint, "grpc")
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
        check_otlp_settings()

    def test_grpc_delivers_to_a_loopback_collector(
        self, clean_otel_env: pytest.MonkeyPatch, grpc_collector: tuple[_GrpcCollector, int]
    ) -> None:
        """The gRPC exporter delivers spans and headers to a real collector on loopback."""
        collector, port = grpc_collector
        spans = _spans(1, 1)
        exporter = otlp_span_exporter(f"http://127.0.0.1:{port}", "grpc", timeout_s=5, headers={"X-Tenant": "t1"})
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        exporter.shutdown()
        (request,) = collector.requests
        assert request == encode_spans(spans)
        assert collector.metadata[0]["x-tenant"] == "t1"

    @pytest.mark.parametrize("suffix", ["", "/", "/v1/traces"])
    def test_http_base_endpoint_gets_the_traces_path(
        self, clean_otel_env: pytest.MonkeyPatch, http_collector: _HttpCollector, suffix: str
    ) -> None:
        """A base endpoint gets /v1/traces appended, and one already ending in it is kept as is."""
        port = http_collector.server_address[1]
        spans = _spans(1, 1)
        exporter = otlp_span_exporter(f"http://127.0.0.1:{port}{suffix}", "http/protobuf", timeout_s=5, headers={"X-Tenant": "t2"})
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        exporter.shutdown()
        ((path, headers, request),) = http_collector.received
        assert path == "/v1/traces"
        assert headers["x-tenant"] == "t2"
        assert request == encode_spans(spans)

    def test_http_endpoint_from_environment_is_resolved_by_the_exporter(
        self, clean_otel_env: pytest.MonkeyPatch, http_collector: _HttpCollector
    ) -> None:
        """With no endpoint argument, OTEL_EXPORTER_OTLP_ENDPOINT (a base URL) is used with /v1/traces."""
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{http_collector.server_address[1]}")
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        exporter = otlp_span_exporter(timeout_s=5)
        assert exporter.export(_spans(1, 1)) is SpanExportResult.SUCCESS
        exporter.shutdown()
        assert [path for path, _, _ in http_collector.received] == ["/v1/traces"]

    def test_environment_timeout_bounds_an_export_to_a_silent_server(self, clean_otel_env: pytest.MonkeyPatch) -> None:
        """OTEL_EXPORTER_OTLP_TIMEOUT (seconds) bounds an export to a server that accepts and never answers."""
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "0.5")
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            exporter = otlp_span_exporter(f"http://127.0.0.1:{silent.getsockname()[1]}", "grpc")
            began = time.monotonic()
            result = exporter.export(_spans(1, 1))
            elapsed = time.monotonic() - began
            exporter.shutdown()
        assert result is SpanExportResult.FAILURE
        assert elapsed < 4.0  # well under the 5 s default: the variable was used


class TestOtlpRequested:
    @pytest.mark.parametrize(
        ("env", "expected"),
        [
            ({}, False),
            ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
            ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
            ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
            ({"OTEL_TRACES_EXPORTER": "console,otlp"}, True),
            ({"OTEL_TRACES_EXPORTER": "OTLP"}, True),
            ({"OTEL_TRACES_EXPORTER": "none"}, False),
            ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, False),
            ({"OTEL_TRACES_EXPORTER": "console", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, False),
            ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, False),
        ],
    )
    def test_reads_the_environment(
        self, clean_otel_env: pytest.MonkeyPatch, env: dict[str, str], expected: bool
    ) -> None:
        """OTLP counts as requested when an OTLP endpoint is set or OTEL_TRACES_EXPORTER names otlp."""
        for key, value in env.items():
            clean_otel_env.setenv(key, value)
        assert otlp_requested() is expected


# -- counting ------------------------------------------------------------------------------------------------


class _SlowExporter(SpanExporter):
    """Sleeps in export until released, then succeeds."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        while not self.release.is_set():
            time.sleep(0.005)
        return SpanExportResult.SUCCESS


class _RaisingExporter(SpanExporter):
    def __init__(self, error: Exception) -> None:
        self.error = error

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise self.error

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        raise self.error

    def shutdown(self) -> None:
        raise self.error


class TestCountingExporter:
    def test_counts_successful_exports(self) -> None:
        """Spans the inner exporter accepts are counted as received and exported."""
        memory = InMemorySpanExporter()
        counting = CountingExporter(memory)
        provider = _provider(counting)
        _generate(provider, tokens=1, layers=1)
        provider.shutdown()
        assert counting.counts() == ExportCounts(received=5, exported=5, failed=0)
        assert len(memory.get_finished_spans()) == 5

    def test_unreachable_grpc_collector_is_a_counted_failure(self, clean_otel_env: pytest.MonkeyPatch) -> None:
        """The real gRPC exporter aimed at a closed loopback port returns FAILURE, counted, logged once, not raised."""
        port = free_port()
        counting = CountingExporter(otlp_span_exporter(f"http://127.0.0.1:{port}", "grpc", timeout_s=0.5))
        spans = _spans(1, 1)
        with capture_logs() as logs:
            assert counting.export(spans) is SpanExportResult.FAILURE
            assert counting.export(spans[:2]) is SpanExportResult.FAILURE
        counting.shutdown()
        assert counting.counts() == ExportCounts(received=7, exported=0, failed=7)
        assert [entry["event"] for entry in logs] == ["exporter.export.failed"]
        assert logs[0]["exporter"] == "OTLPSpanExporter"

    def test_exceptions_become_failures_logged_once_per_kind(self) -> None:
        """An exception from export is caught, counted as failed, and logged once per exception type."""
        spans = _spans(1, 1)
        runtime = CountingExporter(_RaisingExporter(RuntimeError("boom")))
        with capture_logs() as logs:
            assert runtime.export(spans) is SpanExportResult.FAILURE
            assert runtime.export(spans) is SpanExportResult.FAILURE
            runtime.inner = _RaisingExporter(OSError("disk"))
            assert runtime.export(spans) is SpanExportResult.FAILURE
        assert runtime.counts() == ExportCounts(received=15, exported=0, failed=15)
        assert [entry["error"] for entry in logs] == ["RuntimeError('boom')", "OSError('disk')"]

    def test_shutdown_and_force_flush_delegate_without_raising(self) -> None:
        """shutdown and force_flush reach the inner exporter; its exceptions become None and False."""
        counting = CountingExporter(_RaisingExporter(RuntimeError("boom")))
        with capture_logs():
            assert counting.force_flush() is False
            counting.shutdown()
        memory = InMemorySpanExporter()
        CountingExporter(memory).shutdown()
        assert memory.export(_spans(1, 1)) is SpanExportResult.FAILURE  # the inner one was shut down

    def test_a_slow_export_shows_as_pending(self) -> None:
        """While a slow inner export runs its spans count as received and pending, then as exported."""
        slow = _SlowExporter()
        counting = CountingExporter(slow)
        spans = _spans(1, 1)
        results: list[SpanExportResult] = []
        thread = threading.Thread(target=lambda: results.append(counting.export(spans)))
        thread.start()
        assert slow.entered.wait(5)
        during = counting.counts()
        slow.release.set()
        thread.join(5)
        assert during == ExportCounts(received=5, exported=0, failed=0) and during.pending == 5
        assert results == [SpanExportResult.SUCCESS]
        after = counting.counts()
        assert after == ExportCounts(received=5, exported=5, failed=0) and after.pending == 0


class TestPerfettoCap:
    def test_spans_over_the_cap_count_as_lost(self, tmp_path):
        """Spans the Perfetto exporter drops at its cap are lost, and the session counts them
        (it used to answer SUCCESS for the whole batch)."""
        from tests.tracing.conftest import traced_generation
        from tracedoffload.tracing.exporters.perfetto import PerfettoExporter
        from tracedoffload.tracing.sampling import SamplingPolicy
        from tracedoffload.tracing.session import TracingSession

        session = TracingSession([PerfettoExporter(tmp_path / "trace.json", max_spans=5)], policy=SamplingPolicy.full_detail())
        traced_generation(session, new_tokens=3).detach()
        session.shutdown(10)
        assert session.snapshot()["dropped_spans"] > 0
