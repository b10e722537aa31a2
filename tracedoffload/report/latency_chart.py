"""Step latency over the run: every step's wall time, with the slow ones marked and their trace ids
in the hover text (to open in Jaeger or Tempo)."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

from tracedoffload import names
from tracedoffload.report.section import Section
from tracedoffload.report.step_axis import step_axis
from tracedoffload.report.step_row import StepRow

_HOVER = "step %{x}<br>%{y:.3f} ms<br>%{customdata[1]}, layer detail: %{customdata[2]}<br>trace %{customdata[0]}<extra></extra>"


def latency_section(steps: list[StepRow], stats: dict[str, Any]) -> Section:
    """The chart of `steps` (in start order), marking the statistics' slowest steps and the steps
    the tail rule called slow (`step.sampled_by`, the steps carrying the slow-step event)."""
    description = (
        "Wall time of each step (one forward pass), from its step span. Circled: the slowest steps "
        "of the statistics; crossed: steps the tail rule called slow. Hover a point for its trace id."
    )
    notes = []
    # float32 and int32 arrays: plotly writes them as packed binary, a third of the JSON text.
    x = np.fromiter((row.index for row in steps), dtype=np.int32, count=len(steps))
    y = np.fromiter((row.ms for row in steps), dtype=np.float32, count=len(steps))
    figure = go.Figure()
    figure.add_trace(
        go.Scatter(
            x=x,
            y=y,
            mode="lines+markers",
            name="step",
            marker={"size": 4},
            line={"width": 1},
            customdata=[(row.trace_id, row.phase, row.sampled_by) for row in steps],
            hovertemplate=_HOVER,
        )
    )
    slowest = _slowest_rows(steps, stats)
    if slowest:
        figure.add_trace(_marked(slowest, f"the {len(slowest)} slowest (statistics)", {"symbol": "circle-open", "size": 14, "color": "#d62728", "line": {"width": 2}}))
    slow = [row for row in steps if row.slow_by_tail_rule]
    if slow:
        figure.add_trace(_marked(slow, f"slow by the tail rule ({names.EVENT_SLOW_STEP})", {"symbol": "x", "size": 9, "color": "#ff7f0e"}))
    else:
        notes.append(
            f"No step was called slow by the tail rule ({names.STEP_SAMPLED_BY} {' or '.join(names.SLOW_STEP_REASONS)}): none was slower than its thresholds (the relative one needs some steps first), "
            "or every step was exported (full detail), which leaves the rule nothing to pick."
        )
    figure.update_layout(
        template="plotly_white",
        height=380,
        margin={"l": 60, "r": 20, "t": 30, "b": 50},
        xaxis=step_axis(len(steps)),
        yaxis_title="ms",
        legend={"orientation": "h", "y": 1.12},
        hovermode="closest",
    )
    return Section("latency", "Step latency", description, figure=figure, notes=tuple(notes))


def _slowest_rows(steps: list[StepRow], stats: dict[str, Any]) -> list[StepRow]:
    # By trace id and index: one trace per generation gives every step the same trace id.
    by_key = {(row.trace_id, row.index): row for row in steps}
    rows = (by_key.get((entry["trace_id"], entry["step_index"])) for entry in stats.get("slowest_steps", ()))
    return [row for row in rows if row is not None]


def _marked(rows: list[StepRow], name: str, marker: dict[str, Any]) -> go.Scatter:
    return go.Scatter(
        x=[row.index for row in rows],
        y=[row.ms for row in rows],
        mode="markers",
        name=name,
        marker=marker,
        customdata=[(row.trace_id, row.phase, row.sampled_by) for row in rows],
        hovertemplate=_HOVER,
    )
