"""`SpanView`: the few fields of a span that statistics and reports read.

Built from a live SDK span (`from_readable`) or from an exported OTLP JSON file (the exporters'
readers), so the same aggregation runs on both and gives the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan


@dataclasses.dataclass(frozen=True, slots=True)
class SpanView:
    name: str
    trace_id: int
    span_id: int
    parent_span_id: int | None
    start_ns: int
    end_ns: int
    attributes: Mapping[str, Any]
    links: tuple[tuple[int, int], ...] = ()  # (trace_id, span_id) of each linked span

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @classmethod
    def from_readable(cls, span: ReadableSpan) -> SpanView:
        return cls(
            name=span.name,
            trace_id=span.context.trace_id,
            span_id=span.context.span_id,
            parent_span_id=span.parent.span_id if span.parent is not None else None,
            start_ns=span.start_time or 0,
            end_ns=span.end_time or 0,
            attributes=dict(span.attributes or {}),
            links=tuple((link.context.trace_id, link.context.span_id) for link in span.links),
        )
