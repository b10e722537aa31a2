"""`TraceDigest`: one pass over a trace's spans gathers what the report draws, and the statistics.

The statistics are those of `report FILE` (the same `OffloadStats`, fed the same spans, which
checks each step span's figures before anything here reads them); the charts read the step
spans' own figures and the slowest detailed step's layer spans. Nothing is kept per layer span
but that one step's: the digest of a long run stays small.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tracedoffload import names
from tracedoffload.report.detailed_step import SlowestDetailedStep
from tracedoffload.report.step_row import StepRow
from tracedoffload.tracing.spanview import SpanView
from tracedoffload.tracing.stats import SLOWEST_KEPT, OffloadStats

_LAYER_SPAN_NAMES = frozenset((*names.LAYER_SPANS, names.SPAN_DRAFT))
_OFFLOAD_KEYS = (
    names.OFFLOAD_DEVICE,
    names.OFFLOAD_GPU_LAYERS,
    names.OFFLOAD_CPU_LAYERS,
    names.OFFLOAD_RESIDENCY,
    names.OFFLOAD_PREFETCH,
    names.OFFLOAD_PINNED,
    names.OFFLOAD_OFFLOADED_BYTES,
    names.OFFLOAD_DEVICE_POOL_BYTES,
    names.OFFLOAD_PINNED_BYTES,
)


class TraceDigest:
    """Add spans (`add`, or all of them with `add_all`); then read `steps`, `offload`,
    `detailed`, `copy_stream`, `models` and `statistics()`."""

    def __init__(self, slowest_kept: int = SLOWEST_KEPT) -> None:
        self.steps: list[StepRow] = []
        self.offload: dict[str, Any] = {}  # the offload configuration, as the step spans carry it
        self.detailed = SlowestDetailedStep()
        self.copy_stream: str | None = None  # the stream transfers ran on, as their spans name it
        self.models: dict[str, None] = {}  # the generations' models, in order of appearance
        self._stats = OffloadStats(slowest_kept=slowest_kept)

    def add(self, span: SpanView) -> None:
        """Take one span. Raises ValueError naming the attribute when a step span's figures are
        not what this package writes."""
        self._stats.add_view(span)  # first: it checks the step figures and names a bad one
        if span.name == names.SPAN_STEP:
            row = StepRow.from_span(span)
            self.steps.append(row)
            self.detailed.add_step(row)
            for key in _OFFLOAD_KEYS:
                if key in span.attributes:
                    self.offload[key] = span.attributes[key]
        elif span.name in _LAYER_SPAN_NAMES:
            if span.name == names.SPAN_TRANSFER and self.copy_stream is None:
                self.copy_stream = str(span.attributes.get(names.LAYER_STREAM, "")) or None
            self.detailed.add_layer_span(span)
        elif names.GEN_AI_REQUEST_MODEL in span.attributes:
            self.models[str(span.attributes[names.GEN_AI_REQUEST_MODEL])] = None

    def add_all(self, spans: Iterable[SpanView]) -> TraceDigest:
        for span in spans:
            self.add(span)
        return self

    def statistics(self) -> dict[str, Any]:
        """The statistics of the spans added, as `report FILE` computes them (`dropped_spans`
        None: spans lost before export cannot be known from what arrived)."""
        return self._stats.snapshot(dropped_spans=None)

    def steps_in_order(self) -> list[StepRow]:
        """The steps by start time (a file holds them in the order they were exported)."""
        return sorted(self.steps, key=lambda row: row.start_ns)
