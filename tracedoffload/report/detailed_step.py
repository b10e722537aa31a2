"""The layer spans of the slowest step that has them: what the stream chart draws.

A step's layer spans are exported only when the tail rule picks it (trace level `layer`), and in
a file they come before their step span (the step span is made last). So they wait here by
parent until their step span says how long it took; then they are kept if it is the slowest
step with layer detail so far, and dropped otherwise. The memory held is about two steps' spans,
not the whole trace's (a 2,000-step run at full detail has about 170,000 layer spans).
"""

from __future__ import annotations

from tracedoffload.report.step_row import StepRow
from tracedoffload.tracing.spanview import SpanView

# Steps whose layer spans are waiting for their step span. Only a step span lost on the way
# leaves its layer spans waiting for ever: the oldest are dropped past this many.
MAX_WAITING_STEPS = 64


class SlowestDetailedStep:
    """Keeps the slowest step whose span says its layer detail was exported, with its layer spans."""

    def __init__(self) -> None:
        self.step: StepRow | None = None
        self.spans: list[SpanView] = []
        self._waiting: dict[int, list[SpanView]] = {}  # step span id -> its layer spans so far
        self._passed_over: set[int] = set()  # step span ids not kept: their late layer spans go too

    def add_layer_span(self, span: SpanView) -> None:
        parent = span.parent_span_id
        if parent is None or parent in self._passed_over:
            return
        if self.step is not None and parent == self.step.span_id:
            self.spans.append(span)  # a layer span after its step span (a collector may reorder)
            return
        waiting = self._waiting.get(parent)
        if waiting is None:
            if len(self._waiting) >= MAX_WAITING_STEPS:
                del self._waiting[next(iter(self._waiting))]
            waiting = self._waiting[parent] = []
        waiting.append(span)

    def add_step(self, row: StepRow) -> None:
        spans = self._waiting.pop(row.span_id, [])
        if row.layer_detail and (self.step is None or row.duration_ns > self.step.duration_ns):
            if self.step is not None:
                self._passed_over.add(self.step.span_id)
            self.step, self.spans = row, spans
        else:
            self._passed_over.add(row.span_id)
