"""OTLP/JSON encoding of finished spans: `ReadableSpan`s straight to JSON text.

The text is an `ExportTraceServiceRequest` in OTLP/JSON
(https://opentelemetry.io/docs/specs/otel/protocol/file-exporter/): lowerCamelCase field names,
trace and span ids as lowercase hex, 64-bit integers as decimal strings, enums as integers. It runs
on the export thread of a process that is generating tokens, where the protobuf route
(`encode_spans` + `MessageToDict`) costs about ten times as much per span.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring_ascii as _quote  # C-accelerated
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

__all__ = ["encode_otlp_json"]

# OTLP's SpanKind enum is the SDK's shifted by one (0 is SPAN_KIND_UNSPECIFIED).
_KIND = {kind: kind.value + 1 for kind in SpanKind}
_INTERNAL = SpanKind.INTERNAL
_UNSET = StatusCode.UNSET
_UNSET_STATUS = ReadableSpan("default", resource=Resource.get_empty())._status  # the Status(UNSET) object every span gets by default
_NO_TRACE_STATE = DEFAULT_TRACE_STATE
# SpanFlags bits 8 (context has is_remote) and 9 (is_remote), set as the SDK's protobuf encoder sets them.
_FLAGS_LOCAL = 0x100
_FLAGS_REMOTE = 0x300


# -- encoding ---------------------------------------------------------------------------------------
#
# The encoder writes JSON text directly. Building dicts for `json.dumps` cost about 2.6 times as
# much per span (each attribute is two small dicts to build and then to walk), and the protobuf
# route (`encode_spans` + `MessageToDict`) about 10 times. Every string from the span goes
# through json's C escaper, ASCII-only, so the output is valid JSON whatever the span holds.

_KEY_PREFIX: dict[str, str] = {}  # attribute key -> '{"key":"<key>","value":'; keys are few and constant
_KEY_PREFIX_LIMIT = 4096


def _key_prefix(key: str) -> str:
    prefix = _KEY_PREFIX.get(key)
    if prefix is None:
        prefix = '{"key":' + _quote(str(key)) + ',"value":'
        if len(_KEY_PREFIX) < _KEY_PREFIX_LIMIT:
            _KEY_PREFIX[key] = prefix
    return prefix


def _bool_text(value: bool) -> str:
    return "true" if value else "false"


def _double_text(value: float) -> str:
    if value - value == 0.0:  # finite: repr is what json.dumps writes
        return repr(value)
    # proto3 JSON spells the non-finite doubles as strings
    return '"NaN"' if value != value else '"Infinity"' if value > 0 else '"-Infinity"'


def _value(value: Any) -> str:
    """An attribute value as OTLP/JSON `AnyValue` text."""
    # Exact type checks first: they are the common case, and bool must not pass as int.
    kind = type(value)
    if kind is str:
        return '{"stringValue":' + _quote(value) + "}"
    if kind is int:
        return '{"intValue":"' + str(value) + '"}'
    if kind is float:
        return '{"doubleValue":' + _double_text(value) + "}"
    if kind is bool:
        return '{"boolValue":' + _bool_text(value) + "}"
    if kind is tuple or kind is list:
        return '{"arrayValue":{"values":[' + ",".join([_value(v) for v in value]) + "]}}"
    return _value_slow(value)


def _value_slow(value: Any) -> str:
    if value is None:
        return "{}"
    if isinstance(value, bool):
        return _value(bool(value))
    if isinstance(value, str):
        return _value(str(value))
    if isinstance(value, int):
        return _value(int(value))
    if isinstance(value, float):
        return _value(float(value))
    if isinstance(value, (bytes, bytearray)):
        return '{"bytesValue":"' + base64.b64encode(value).decode("ascii") + '"}'
    if isinstance(value, Mapping):
        return '{"kvlistValue":{"values":[' + _attributes(value) + "]}}"
    if isinstance(value, Sequence):
        return '{"arrayValue":{"values":[' + ",".join([_value(v) for v in value]) + "]}}"
    return _value(str(value))  # the SDK's encoder drops such values; a string keeps the information


def _items(attributes: Mapping[str, Any]) -> Any:
    if type(attributes) is dict:
        return attributes.items()
    # span.attributes is a MappingProxyType over BoundedAttributes, whose generic items() view
    # runs in Python; copy() hands back the plain dict underneath and iterates in C.
    try:
        return attributes.copy().items()  # type: ignore[attr-defined]
    except AttributeError:
        return attributes.items()


def _attributes(attributes: Mapping[str, Any]) -> str:
    # _value and _key_prefix inlined for the common types: this loop is most of the encoder's time.
    prefixes = _KEY_PREFIX
    out = []
    for key, value in _items(attributes):
        prefix = prefixes.get(key) or _key_prefix(key)
        kind = type(value)
        if kind is str:
            out.append(prefix + '{"stringValue":' + _quote(value) + "}}")
        elif kind is int:
            out.append(prefix + '{"intValue":"' + str(value) + '"}}')
        elif kind is bool:
            out.append(prefix + ('{"boolValue":true}}' if value else '{"boolValue":false}}'))
        elif (kind is list or kind is tuple) and all(type(v) is int for v in value):
            # Integer arrays (the step span's per-layer figures): str() of each value in C.
            values = '{"intValue":"' + '"},{"intValue":"'.join(map(str, value)) + '"}' if value else ""
            out.append(prefix + '{"arrayValue":{"values":[' + values + "]}}}")
        else:
            out.append(prefix + _value(value) + "}")
    return ",".join(out)


def _trace_state(trace_state: Any) -> str:
    return _quote(",".join(f"{key}={value}" for key, value in trace_state.items()))


# A step's layer spans share its trace id and parent: format each once (measured: 15% of a layer
# span's encoding time).
_PARENTLESS = f',"flags":{_FLAGS_LOCAL}'


@functools.lru_cache(maxsize=256)
def _trace_hex(trace_id: int) -> str:
    return "%032x" % trace_id


@functools.lru_cache(maxsize=256)
def _parent_fields(span_id: int, is_remote: bool) -> str:
    return ',"parentSpanId":"%016x","flags":%d' % (span_id, _FLAGS_REMOTE if is_remote else _FLAGS_LOCAL)


def _span(span: ReadableSpan) -> str:
    if type(span) is ReadableSpan:
        fast = _plain_span(span)
        if fast is not None:
            return fast
        # The SDK's finished span, read through the fields its properties wrap: `attributes`,
        # `events` and `links` build a fresh proxy or tuple on every read (measured: a quarter
        # of the per-span encoding time of a layer span).
        context, parent, attributes = span._context, span._parent, span._attributes
        events, links, status, kind = span._events, span._links, span._status, span._kind
    else:
        context, parent, attributes = span.context, span.parent, span.attributes
        events, links, status, kind = span.events, span.links, span.status, span.kind
    trace_state = f',"traceState":{_trace_state(context.trace_state)}' if context.trace_state else ""
    parent_flags = _PARENTLESS if parent is None else _parent_fields(parent.span_id, parent.is_remote)
    if attributes:
        attrs = ',"attributes":[' + _attributes(attributes) + "]"
        if dropped := span.dropped_attributes:
            attrs += f',"droppedAttributesCount":{dropped}'
    else:
        attrs = ""
    evs_lns = _events_and_links(span, events, links) if events or links else ""
    # status is always present, as the SDK's protobuf encoder sets it; code 0 (UNSET) is the default.
    if status is None or (status.status_code is _UNSET and not status.description):
        status_json = "{}"
    else:
        code, message = status.status_code.value, status.description
        parts = ([f'"code":{code}'] if code else []) + ([f'"message":{_quote(message)}'] if message else [])
        status_json = "{" + ",".join(parts) + "}"
    return '{"traceId":"%s","spanId":"%016x"%s%s,"name":%s,"kind":%d,"startTimeUnixNano":"%d","endTimeUnixNano":"%d"%s%s,"status":%s}' % (
        _trace_hex(context.trace_id),
        context.span_id,
        trace_state,
        parent_flags,
        _quote(span.name),
        1 if kind is _INTERNAL else _KIND[kind],  # identity first: an enum's hash runs in Python
        span.start_time or 0,
        span.end_time or 0,
        attrs,
        evs_lns,
        status_json,
    )


def _events_and_links(span: ReadableSpan, events: Any, links: Any) -> str:
    text = ""
    if events:
        text = ',"events":[' + ",".join([_event(event) for event in events]) + "]"
        if dropped := span.dropped_events:
            text += f',"droppedEventsCount":{dropped}'
    if links:
        text += ',"links":[' + ",".join([_link(link) for link in links]) + "]"
        if dropped := span.dropped_links:
            text += f',"droppedLinksCount":{dropped}'
    return text


# -- plain spans, by template ---------------------------------------------------------------------
#
# Nearly every span of a run is a layer or step span of a few fixed shapes: the same name and
# attribute keys with values of the same types, internal, no trace state or status. For each shape
# the whole span is one %-format template, so a span costs one formatting call plus a conversion
# for each string, bool, float or array (measured on a run's captured layer spans: 173 against
# 244 µs per token's 56 spans, same bytes; measured again on the step model: 191 against 253 µs
# per full-detail step of 61 spans).

_SHAPES: dict[tuple[Any, ...], tuple[str, tuple[tuple[int, Any], ...]] | None] = {}
_SHAPE_LIMIT = 1024


_INT_ONLY = frozenset((int,))
_INT_ARRAYS: dict[int, str] = {}  # length -> template of an integer array's text


def _array_text(values: Any) -> str:
    # The step span's per-layer figures: integer arrays of the layer count, formatted by one
    # template per length (measured: 1.7 against 2.9 µs for a join of str() over 28 values).
    if _INT_ONLY.issuperset(map(type, values)):
        template = _INT_ARRAYS.get(len(values))
        if template is None:
            items = '{"intValue":"' + '"},{"intValue":"'.join(["%d"] * len(values)) + '"}' if values else ""
            template = '{"arrayValue":{"values":[' + items + "]}}"
            if len(_INT_ARRAYS) < _SHAPE_LIMIT:
                _INT_ARRAYS[len(values)] = template
        return template % tuple(values)
    return _value(values)


_TEMPLATED_VALUES = {
    int: ('{"intValue":"%d"}}', None),
    str: ('{"stringValue":%s}}', _quote),
    bool: ('{"boolValue":%s}}', _bool_text),
    float: ('{"doubleValue":%s}}', _double_text),
    list: ("%s}", _array_text),
    tuple: ("%s}", _array_text),
}


def _shape_template(name: str, keys: tuple[Any, ...], types: tuple[type, ...]) -> tuple[str, tuple[tuple[int, Any], ...]] | None:
    """The span's text with %-slots for ids, times and values, and the converters of the values."""
    parts, converters = [], []
    for position, (key, kind) in enumerate(zip(keys, types)):
        slot = _TEMPLATED_VALUES.get(kind)
        if slot is None or type(key) is not str:
            return None  # None, mappings, subclasses: the general path handles them
        parts.append(_key_prefix(key).replace("%", "%%") + slot[0])
        if slot[1] is not None:
            converters.append((position, slot[1]))
    template = (
        '%s%016x%s,"name":' + _quote(name).replace("%", "%%")
        + ',"kind":1,"startTimeUnixNano":"%d","endTimeUnixNano":"%d","attributes":[' + ",".join(parts) + ']%s,"status":{}}'
    )
    return template, tuple(converters)


# The ids around the span id, for the last parent seen: a step's layer spans come one after another.
_last_ids: tuple[Any, int, str, str] = (None, 0, "", "")


def _ids_around_span_id(trace_id: int, parent: Any) -> tuple[str, str]:
    global _last_ids
    last_parent, last_trace_id, head, tail = _last_ids  # one read: other exporter threads may swap it
    if parent is last_parent and trace_id == last_trace_id and parent is not None:
        return head, tail
    head = '{"traceId":"' + _trace_hex(trace_id) + '","spanId":"'
    tail = '"' + (_PARENTLESS if parent is None else _parent_fields(parent.span_id, parent.is_remote))
    _last_ids = (parent, trace_id, head, tail)
    return head, tail


def _plain_span(span: ReadableSpan) -> str | None:
    """A span of a plain shape by its template, or None for the general path."""
    attributes, context, status = span._attributes, span._context, span._status
    trace_state = context.trace_state
    if (
        type(attributes) is not dict
        or not attributes
        or span._kind is not _INTERNAL
        or (trace_state is not _NO_TRACE_STATE and trace_state)
        or not (status is _UNSET_STATUS or status is None or (status.status_code is _UNSET and not status.description))
    ):
        return None
    key = (span._name, tuple(attributes), tuple(map(type, attributes.values())))
    shape = _SHAPES.get(key, _SHAPES)
    if shape is _SHAPES:
        shape = _shape_template(*key) if type(span._name) is str else None
        if len(_SHAPES) < _SHAPE_LIMIT:
            _SHAPES[key] = shape
    if shape is None:
        return None
    template, converters = shape
    values = list(attributes.values())
    for position, convert in converters:
        values[position] = convert(values[position])
    head, tail = _ids_around_span_id(context.trace_id, span._parent)
    events, links = span._events, span._links
    evs_lns = _events_and_links(span, events, links) if events or links else ""
    return template % (head, context.span_id, tail, span._start_time or 0, span._end_time or 0, *values, evs_lns)


# A step that served a batch of 16 gives 16 generations an event each, with one attributes dict,
# and links to 16 generation spans that every other step of theirs links to as well: their text
# is kept by identity (`_cached`). Measured on a replayed batch-16 run: encoding cut from 126 to
# 107 µs per step.
_shared_cache: dict[int, tuple[Any, str]] = {}
_SHARED_LIMIT = 4096


def _shared(obj: Any, encode: Any) -> str:
    return _cached(_shared_cache, obj, encode, _SHARED_LIMIT)


def _event(event: Any) -> str:
    text = f'{{"timeUnixNano":"{event.timestamp}","name":{_quote(event.name)}'
    attributes = event.attributes
    if attributes:
        text += ',"attributes":[' + (_shared(attributes, _attributes) if type(attributes) is dict else _attributes(attributes)) + "]"
        if dropped := event.dropped_attributes:
            text += f',"droppedAttributesCount":{dropped}'
    return text + "}"


def _link(link: Any) -> str:
    if not link.attributes:
        return _shared(link.context, _link_to)
    return _link_to(link.context, link)


def _link_to(context: Any, link: Any = None) -> str:
    text = f'{{"traceId":"{context.trace_id:032x}","spanId":"{context.span_id:016x}"'
    if context.trace_state:
        text += f',"traceState":{_trace_state(context.trace_state)}'
    if link is not None and link.attributes:
        text += ',"attributes":[' + _attributes(link.attributes) + "]"
        if dropped := link.dropped_attributes:
            text += f',"droppedAttributesCount":{dropped}'
    return text + f',"flags":{_FLAGS_REMOTE if context.is_remote else _FLAGS_LOCAL}}}'


def _resource(resource: Any) -> str:
    attributes = resource.attributes if resource is not None else None
    return '{"attributes":[' + _attributes(attributes) + "]}" if attributes else "{}"


def _scope(scope: Any) -> str:
    if scope is None:
        return "{}"
    text = '{"name":' + _quote(scope.name or "")
    if scope.version:
        text += ',"version":' + _quote(scope.version)
    if scope.attributes:
        text += ',"attributes":[' + _attributes(scope.attributes) + "]"
    return text + "}"


# Resources and scopes are immutable and shared by every span of a provider: encode each once.
# Keyed by id() with the object kept in the value, so an id cannot be reused while cached.
_resource_cache: dict[int, tuple[Any, str]] = {}
_scope_cache: dict[int, tuple[Any, str]] = {}
_CACHE_LIMIT = 64


def _cached(cache: dict[int, tuple[Any, str]], obj: Any, encode: Any, limit: int = _CACHE_LIMIT) -> str:
    """`encode(obj)`, kept by the object's identity (the object is kept with it, so its id cannot
    be reused while cached); the cache is emptied when it reaches `limit` entries."""
    hit = cache.get(id(obj))
    if hit is not None and hit[0] is obj:
        return hit[1]
    encoded = encode(obj)
    if len(cache) >= limit:
        cache.clear()
    cache[id(obj)] = (obj, encoded)
    return encoded


def encode_otlp_json(spans: Sequence[ReadableSpan]) -> str:
    """Encode spans as one OTLP/JSON `ExportTraceServiceRequest`, as one line of ASCII JSON text.

    Spans are grouped by resource, then by instrumentation scope, in first-seen order, as the
    SDK's protobuf encoder (`encode_spans`) groups them; every field it sets is written, with ids
    as hex as OTLP/JSON requires. Thread-safe.

    Args:
        spans: Finished spans.

    Returns:
        `{"resourceSpans":[...]}` without a trailing newline.
    """
    # Resources are found by identity first: Resource.__hash__ serialises its attributes to JSON.
    # Equal resources (and equal scopes) still share a group, as in the SDK's encoder. The spans
    # hold their resources alive for the whole call, so ids cannot be reused meanwhile.
    groups: list[tuple[Any, dict[Any, list[str]]]] = []
    by_id: dict[int, tuple[Any, dict[Any, list[str]]]] = {}
    last_resource: Any = groups  # a sentinel no span carries
    last_scope: Any = groups
    bucket: list[str] = []
    for span in spans:
        resource = span.resource
        scope = span.instrumentation_scope
        if resource is not last_resource or scope is not last_scope:
            group = by_id.get(id(resource))
            if group is None:
                group = next((g for g in groups if g[0] == resource), None)
                if group is None:
                    group = (resource, {})
                    groups.append(group)
                by_id[id(resource)] = group
            bucket = group[1].setdefault(scope, [])
            last_resource, last_scope = resource, scope
        bucket.append(_span(span))
    resource_spans = []
    for resource, scopes in groups:
        scope_spans = []
        for scope, encoded_spans in scopes.items():
            schema = f',"schemaUrl":{_quote(scope.schema_url)}' if scope is not None and scope.schema_url else ""
            scope_json = _cached(_scope_cache, scope, _scope)
            scope_spans.append('{"scope":' + scope_json + ',"spans":[' + ",".join(encoded_spans) + "]" + schema + "}")
        schema = (
            f',"schemaUrl":{_quote(resource.schema_url)}' if resource is not None and resource.schema_url else ""
        )
        resource_json = _cached(_resource_cache, resource, _resource)
        resource_spans.append(
            '{"resource":' + resource_json + ',"scopeSpans":[' + ",".join(scope_spans) + "]" + schema + "}"
        )
    return '{"resourceSpans":[' + ",".join(resource_spans) + "]}"
