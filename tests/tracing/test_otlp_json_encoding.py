"""The OTLP/JSON encoder against the SDK's own protobuf encoder: the same request, span by span,
for a traced run (steps with links, generations with events) and for awkward values."""

from __future__ import annotations

import math

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import Link, SpanContext, Status, StatusCode, TraceFlags

from tracedoffload.tracing.exporters.otlp_json import encode_otlp_json
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import TracingSession

from .conftest import traced_generation
from .otlp_protobuf import parse_as_protobuf

RESOURCE = Resource({"service.name": "templates"})
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C


def _span(name: str, attributes: dict, span_id: int = 0x10, parent: SpanContext | None = None, **extra) -> ReadableSpan:
    context = SpanContext(TRACE_ID, span_id, is_remote=False, trace_flags=TraceFlags(1))
    return ReadableSpan(name, context, parent, RESOURCE, attributes, start_time=1_000, end_time=2_500, **extra)


def test_a_traced_run_encodes_as_the_sdk_encodes_it(memory_exporter):
    session = TracingSession([memory_exporter], policy=SamplingPolicy.full_detail())
    offloader = traced_generation(session)
    session.shutdown(10)
    offloader.detach()
    spans = memory_exporter.get_finished_spans()
    assert len(spans) > 50
    assert any(s.links for s in spans) and any(s.events for s in spans)
    assert parse_as_protobuf(encode_otlp_json(spans)) == encode_spans(spans)


@pytest.mark.parametrize(
    "attributes",
    [
        {"percent%d": 1, "s": "100%s é\"\n", "b": False, "t": True},
        {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "f": 1e-300, "neg": -0.0},
        {"big": 2**62, "negative": -(2**62), "zero": 0},
        {"ints": [1, 2, 3], "empty": (), "words": ("a", "b"), "flags": [True, False], "floats": (0.5, math.nan), "after": 3},
    ],
)
def test_awkward_values_and_keys_encode_as_the_sdk_encodes_them(attributes):
    parent = SpanContext(TRACE_ID, 0x99, is_remote=True)
    spans = [_span("name with %s", attributes), _span("child", attributes, span_id=0x11, parent=parent), _span("again", attributes, span_id=0x12, parent=parent)]
    assert parse_as_protobuf(encode_otlp_json(spans)) == encode_spans(spans)


def test_events_and_links_encode_as_the_sdk_encodes_them():
    linked = SpanContext(0xABC, 0xDEF, is_remote=True)
    spans = [
        _span("with both", {"a": [1, 2]}, events=(Event("slow", {"reason": "p95"}, timestamp=1_200),), links=(Link(linked, {"why": "generation"}),)),
        _span("with a link", {"a": [3]}, span_id=0x11, links=(Link(linked),)),
        _span("with an event", {"a": [4]}, span_id=0x12, events=(Event("e", timestamp=1_300),)),
    ]
    assert parse_as_protobuf(encode_otlp_json(spans)) == encode_spans(spans)


def test_status_and_empty_attributes_encode_as_the_sdk_encodes_them():
    spans = [
        _span("errored", {"a": 1}, status=Status(StatusCode.ERROR, "boom")),
        _span("ok", {"a": 1}, span_id=0x11, status=Status(StatusCode.OK)),
        _span("no attributes", {}, span_id=0x12),
    ]
    assert parse_as_protobuf(encode_otlp_json(spans)) == encode_spans(spans)
