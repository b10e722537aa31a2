"""The copy stream against the compute stream for the slowest step: its layer spans as bars on a
time line, so a compute waiting for its copy shows as a gap.

Only exported layer spans are drawn. When the slowest step's were not exported, the slowest step
that has them is drawn and the page says so; when none were (a trace below level `layer`), the
page says that instead of drawing a time line made up from the per-layer sums.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from tracedoffload import names
from tracedoffload.report.detailed_step import SlowestDetailedStep
from tracedoffload.report.section import Section
from tracedoffload.report.step_row import StepRow
from tracedoffload.tracing.spanview import SpanView

COMPUTE_ROW = "compute stream"
_COLOURS = {names.SPAN_TRANSFER: "#1f77b4", names.SPAN_COMPUTE: "#2ca02c", names.SPAN_RELEASE: "#9467bd", names.SPAN_DRAFT: "#8c564b"}
_HOVER = "%{customdata[0]}<br>starts %{base:.3f} ms into the step, lasts %{x:.3f} ms<br>%{customdata[1]}<extra></extra>"


def stream_section(detailed: SlowestDetailedStep, slowest: StepRow, copy_stream: str | None) -> Section:
    """The time line of `detailed`'s step; `slowest`: the slowest step of all (for the note when
    it is not the one drawn); `copy_stream`: the stream name the transfer spans carry."""
    title = "Copy stream against compute stream (slowest step)"
    description = (
        f"The {names.SPAN_TRANSFER} spans on the copy stream and the {names.SPAN_COMPUTE} and {names.SPAN_RELEASE} spans "
        "on the compute stream of one step, from their own start and end times."
    )
    step = detailed.step
    if step is None:
        return Section(
            "streams",
            title,
            description,
            notes=(f"No layer spans in this trace ({names.STEP_LAYER_DETAIL} is false on every step): they are exported at --trace-level layer. Nothing is drawn.",),
        )
    notes = []
    if step.span_id != slowest.span_id:
        notes.append(
            f"The slowest step (step {slowest.index}, {slowest.ms:.3f} ms, trace {slowest.trace_id}) has no exported layer spans "
            f"({names.STEP_SAMPLED_BY} {slowest.sampled_by}); drawn instead: the slowest step that has them."
        )
    if not detailed.spans:
        notes.append(f"Step {step.index}'s span says its layer spans were exported, but none is in the trace (lost before export): nothing is drawn.")
        return Section("streams", title, description, notes=tuple(notes))
    copy_row = f"copy stream ({copy_stream})" if copy_stream else "copy stream"
    figure = go.Figure()
    by_name: dict[str, list[SpanView]] = {}
    for span in sorted(detailed.spans, key=lambda span: span.start_ns):
        by_name.setdefault(span.name, []).append(span)
    for name, spans in by_name.items():
        figure.add_trace(
            go.Bar(
                orientation="h",
                y=[copy_row if name == names.SPAN_TRANSFER else COMPUTE_ROW for _ in spans],
                base=[(span.start_ns - step.start_ns) / 1e6 for span in spans],
                x=[span.duration_ns / 1e6 for span in spans],
                name=name,
                marker={"color": _COLOURS.get(name, "#7f7f7f"), "line": {"width": 0.5, "color": "white"}},
                customdata=[(_label(span), _details(span)) for span in spans],
                hovertemplate=_HOVER,
            )
        )
    figure.update_layout(
        template="plotly_white",
        barmode="overlay",  # bars of one stream never overlap in time; overlaid, each keeps its own position
        height=280,
        margin={"l": 140, "r": 20, "t": 30, "b": 50},
        xaxis_title="ms since the step's start",
        yaxis={"categoryorder": "array", "categoryarray": [COMPUTE_ROW, copy_row]},
        legend={"orientation": "h", "y": 1.2},
    )
    drawn = f"Step {step.index} ({step.phase}, {step.ms:.3f} ms, {names.STEP_SAMPLED_BY} {step.sampled_by}), trace {step.trace_id}: {len(detailed.spans)} layer spans."
    return Section("streams", title, description, figure=figure, notes=(*notes, drawn))


def _label(span: SpanView) -> str:
    index = span.attributes.get(names.LAYER_INDEX)
    return f"{span.name} layer {index}" if index is not None else span.name


def _details(span: SpanView) -> str:
    """What the span says beyond its times, for the hover text (a figure of the wrong type in a
    file is shown as "?" rather than stopping the report: it only labels a bar)."""
    attributes = span.attributes
    if span.name == names.SPAN_TRANSFER:
        return (
            f"{_scaled(attributes.get(names.LAYER_BYTES), 2**20)} MiB at {_scaled(attributes.get(names.LAYER_GBPS), 1)} GB/s, "
            f"prefetched: {attributes.get(names.LAYER_PREFETCHED)}, hidden behind compute {_scaled(attributes.get(names.LAYER_OVERLAP_NS), 1e6)} ms"
        )
    if span.name == names.SPAN_COMPUTE:
        if attributes.get(names.LAYER_OFFLOADED):
            return f"offloaded layer, waited {_scaled(attributes.get(names.LAYER_WAIT_NS), 1e6)} ms for its copy"
        return "resident layer"
    if span.name == names.SPAN_RELEASE:
        return f"slot {attributes.get(names.LAYER_SLOT)} handed back"
    return "the draft model's forward"


def _scaled(value: Any, divisor: float) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value / divisor:.3f}"
    return "?"
