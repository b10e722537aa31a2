"""The encoder's template path (plain spans by shape) writes the very bytes of its general path."""

from __future__ import annotations

import math

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import Link, SpanContext, Status, StatusCode, TraceFlags

from tracedoffload.tracing.exporters import otlp_json
from tracedoffload.tracing.exporters.otlp_json import encode_otlp_json
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import TracingSession

from .conftest import traced_generation
from .otlp_protobuf import parse_as_protobuf

RESOURCE = Resource({"service.name": "templates"})
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C


def _general_path(spans, monkeypatch) -> str:
    with monkeypatch.context() as patch:
        patch.setattr(otlp_json, "_plain_span", lambda span: None)
        return encode_otlp_json(spans)


def _span(name: str, attributes: dict, span_id: int = 0x10, parent: SpanContext | None = None, **extra) -> ReadableSpan:
    context = SpanContext(TRACE_ID, span_id, is_remote=False, trace_flags=TraceFlags(1))
    return ReadableSpan(name, context, parent, RESOURCE, attributes, start_time=1_000, end_time=2_500, **extra)


def test_a_traced_run_encodes_byte_for_byte_as_the_general_path(memory_exporter, monkeypatch):
    session = TracingSession([memory_exporter], policy=SamplingPolicy.full_detail())
    offloader = traced_generation(session)
    session.shutdown(10)
    offloader.detach()
    spans = memory_exporter.get_finished_spans()
    assert len(spans) > 50
    assert any(s.links for s in spans) and any(s.events for s in spans)  # steps' links, the generation's step events
    fast = encode_otlp_json(spans)
    assert fast == _general_path(spans, monkeypatch)
    assert parse_as_protobuf(fast) == encode_spans(spans)


@pytest.mark.parametrize(
    "attributes",
    [
        {"percent%d": 1, "s": "100%s é\"\n", "b": False, "t": True},
        {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "f": 1e-300, "neg": -0.0},
        {"big": 2**70, "negative": -5, "zero": 0},
        {"ints": [1, 2, 3], "empty": (), "words": ("a", "b"), "flags": [True, False], "floats": (0.5, math.nan), "after": 3},
        {"none": None},  # not a valid attribute value: the general path writes {}
    ],
)
def test_awkward_values_and_keys_give_the_same_bytes(attributes, monkeypatch):
    parent = SpanContext(TRACE_ID, 0x99, is_remote=True)
    spans = [_span("name with %s", attributes), _span("child", attributes, span_id=0x11, parent=parent), _span("again", attributes, span_id=0x12, parent=parent)]
    assert encode_otlp_json(spans) == _general_path(spans, monkeypatch)


def test_events_and_links_are_written_as_the_general_path_writes_them(monkeypatch):
    linked = SpanContext(0xABC, 0xDEF, is_remote=True)
    spans = [
        _span("with both", {"a": [1, 2]}, events=(Event("slow", {"reason": "p95"}, timestamp=1_200),), links=(Link(linked, {"why": "generation"}),)),
        _span("with a link", {"a": [3]}, span_id=0x11, links=(Link(linked),)),
        _span("with an event", {"a": [4]}, span_id=0x12, events=(Event("e", timestamp=1_300),)),
    ]
    fast = encode_otlp_json(spans)
    assert fast == _general_path(spans, monkeypatch)
    assert parse_as_protobuf(fast) == encode_spans(spans)


def test_spans_outside_the_plain_shape_take_the_general_path(monkeypatch):
    spans = [
        _span("errored", {"a": 1}, status=Status(StatusCode.ERROR, "boom")),
        _span("ok", {"a": 1}, span_id=0x11, status=Status(StatusCode.OK)),
        _span("no attributes", {}, span_id=0x12),
    ]
    for span in spans:
        assert otlp_json._plain_span(span) is None
    assert parse_as_protobuf(encode_otlp_json(spans)) == encode_spans(spans)


def test_more_shapes_than_the_cache_holds_still_encode(monkeypatch):
    monkeypatch.setattr(otlp_json, "_SHAPES", {})
    monkeypatch.setattr(otlp_json, "_SHAPE_LIMIT", 4)
    spans = [_span(f"shape {n}", {f"key{n}": n}, span_id=0x10 + n) for n in range(12)]
    assert encode_otlp_json(spans) == _general_path(spans, monkeypatch)
    assert len(otlp_json._SHAPES) == 4
