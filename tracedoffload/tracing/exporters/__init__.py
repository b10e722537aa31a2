"""Span exporters: OTLP/JSON lines files, Perfetto traces, the SDK's OTLP exporters, and a counter.

Every exporter here is a real `opentelemetry.sdk.trace.export.SpanExporter`, meant to sit behind
the SDK's `BatchSpanProcessor`, and none raises from `export`.

Example:
    >>> from opentelemetry.sdk.trace.export import BatchSpanProcessor
    >>> exporter = CountingExporter(OtlpJsonLinesExporter("trace.jsonl"))
    >>> provider.add_span_processor(BatchSpanProcessor(exporter))
    >>> views = list(read_otlp_jsonl("trace.jsonl"))
"""

from tracedoffload.tracing.exporters.counting import CountingExporter, ExportCounts
from tracedoffload.tracing.exporters.jsonl import OtlpJsonLinesExporter, encode_otlp_json, read_otlp_jsonl
from tracedoffload.tracing.exporters.otlp import check_otlp_settings, otlp_requested, otlp_span_exporter
from tracedoffload.tracing.exporters.perfetto import PerfettoExporter

__all__ = [
    "CountingExporter",
    "ExportCounts",
    "OtlpJsonLinesExporter",
    "PerfettoExporter",
    "check_otlp_settings",
    "encode_otlp_json",
    "otlp_requested",
    "otlp_span_exporter",
    "read_otlp_jsonl",
]
