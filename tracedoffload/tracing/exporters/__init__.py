"""Span exporters: OTLP/JSON lines files, Perfetto traces, the SDK's OTLP exporters, and a counter.

Every exporter here is a real `opentelemetry.sdk.trace.export.SpanExporter`, meant to sit behind
the SDK's `BatchSpanProcessor`, and none raises from `export`.

Example:
    >>> from opentelemetry.sdk.trace.export import BatchSpanProcessor
    >>> exporter = CountingExporter(OtlpJsonLinesExporter("trace.jsonl"))
    >>> provider.add_span_processor(BatchSpanProcessor(exporter))
    >>> views = list(read_otlp_jsonl("trace.jsonl"))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Each name and its module, imported on first use: checking the OTLP settings (the command line,
# before it loads anything) must not import every exporter and the SDK with them.
_EXPORTS = {
    "CountingExporter": "counting",
    "ExportCounts": "counting",
    "OtlpJsonLinesExporter": "jsonl",
    "PerfettoExporter": "perfetto",
    "check_otlp_settings": "otlp",
    "encode_otlp_json": "jsonl",
    "otlp_requested": "otlp",
    "otlp_span_exporter": "otlp",
    "read_otlp_jsonl": "jsonl",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tracedoffload.tracing.exporters' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tracedoffload.tracing.exporters.{module}"), name)


if TYPE_CHECKING:
    from tracedoffload.tracing.exporters.counting import CountingExporter, ExportCounts
    from tracedoffload.tracing.exporters.jsonl import OtlpJsonLinesExporter, encode_otlp_json, read_otlp_jsonl
    from tracedoffload.tracing.exporters.otlp import check_otlp_settings, otlp_requested, otlp_span_exporter
    from tracedoffload.tracing.exporters.perfetto import PerfettoExporter
