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

from typing import TYPE_CHECKING

from tracedoffload._lazy import lazy_exports

# Each name and its module, imported on first use: checking the OTLP settings (the command line,
# before it loads anything) must not import every exporter and the SDK with them.
_EXPORTS = {
    "CountingExporter": f"{__name__}.counting",
    "ExportCounts": f"{__name__}.counting",
    "OtlpJsonLinesExporter": f"{__name__}.jsonl",
    "PerfettoExporter": f"{__name__}.perfetto",
    "check_otlp_settings": f"{__name__}.otlp",
    "encode_otlp_json": f"{__name__}.jsonl",
    "otlp_requested": f"{__name__}.otlp",
    "otlp_span_exporter": f"{__name__}.otlp",
    "read_otlp_jsonl": f"{__name__}.jsonl",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from tracedoffload.tracing.exporters.counting import CountingExporter, ExportCounts
    from tracedoffload.tracing.exporters.jsonl import OtlpJsonLinesExporter, encode_otlp_json, read_otlp_jsonl
    from tracedoffload.tracing.exporters.otlp import check_otlp_settings, otlp_requested, otlp_span_exporter
    from tracedoffload.tracing.exporters.perfetto import PerfettoExporter
