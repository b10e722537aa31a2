"""`StepRow`: the figures of one step span that the report's charts read, checked as they are read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from tracedoffload import names
from tracedoffload.tracing.spanview import SpanView


class StepRow(NamedTuple):
    """One step (forward pass). Figures a span does not carry are None (memory that was not
    readable, a trace written before an attribute existed): a chart says so, never draws a 0."""

    index: int
    start_ns: int
    duration_ns: int
    trace_id: str  # 32 hex digits, as Jaeger and Tempo take it
    span_id: int
    phase: str
    sampled_by: str
    layer_detail: bool
    kv_tokens: int | None
    layers_compute_ns: tuple[int, ...] | None
    layers_transfer_ns: tuple[int, ...] | None
    layers_wait_ns: tuple[int, ...] | None
    host_rss_bytes: int | None
    device_allocated_bytes: int | None
    kv_bytes_per_token: int | None

    @property
    def ms(self) -> float:
        return self.duration_ns / 1e6

    @property
    def slow_by_tail_rule(self) -> bool:
        """Whether the tail rule called it slow (it then carries the slow-step event too)."""
        return self.sampled_by in names.SLOW_STEP_REASONS

    @classmethod
    def from_span(cls, span: SpanView) -> StepRow:
        """Raises ValueError naming the attribute when a figure is not what this package writes."""
        attributes = span.attributes
        return cls(
            index=_integer(attributes, names.STEP_INDEX, -1),
            start_ns=span.start_ns,
            duration_ns=span.duration_ns,
            trace_id=f"{span.trace_id:032x}",
            span_id=span.span_id,
            phase=str(attributes.get(names.STEP_PHASE, "")),
            sampled_by=str(attributes.get(names.STEP_SAMPLED_BY, "")),
            layer_detail=bool(attributes.get(names.STEP_LAYER_DETAIL, False)),
            kv_tokens=_integer(attributes, names.STEP_KV_TOKENS),
            layers_compute_ns=_integers(attributes, names.STEP_LAYERS_COMPUTE_NS),
            layers_transfer_ns=_integers(attributes, names.STEP_LAYERS_TRANSFER_NS),
            layers_wait_ns=_integers(attributes, names.STEP_LAYERS_WAIT_NS),
            host_rss_bytes=_integer(attributes, names.MEMORY_HOST_RSS),
            device_allocated_bytes=_integer(attributes, names.MEMORY_DEVICE_ALLOCATED),
            kv_bytes_per_token=_integer(attributes, names.MEMORY_KV_EXPECTED_BYTES_PER_TOKEN),
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(attributes: Mapping[str, Any], key: str, default: int | None = None) -> int | None:
    value = attributes.get(key)
    if value is None:
        return default
    if not _is_int(value):
        raise ValueError(f"step span attribute {key}={value!r}: expected an integer")
    return value


def _integers(attributes: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    values = attributes.get(key)
    if values is None:
        return None
    if not (isinstance(values, (list, tuple)) and all(_is_int(v) for v in values)):
        raise ValueError(f"step span attribute {key}={values!r}: expected an array of integers, one per layer")
    return tuple(values)
