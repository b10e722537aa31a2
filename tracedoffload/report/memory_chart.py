"""Host and device memory after each step, beside the growth the KV cache accounts for.

The readings are the step spans' (taken at the step's quiet point). The expected line is the
first reading plus the planner's KV bytes per token times the KV tokens held since then
(`step.kv_tokens`): what the leak detector allows for. Memory that climbs away from it is
what the detector judges.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tracedoffload import names
from tracedoffload.report.section import Section
from tracedoffload.report.step_axis import step_axis
from tracedoffload.report.step_row import StepRow

MIB = 2**20
# (title, the step span's reading, how a StepRow gives it)
_SOURCES: tuple[tuple[str, str, Callable[[StepRow], int | None]], ...] = (
    ("host (resident set)", names.MEMORY_HOST_RSS, lambda row: row.host_rss_bytes),
    ("device (allocated by tensors)", names.MEMORY_DEVICE_ALLOCATED, lambda row: row.device_allocated_bytes),
)


def memory_section(steps: list[StepRow]) -> Section:
    """The memory chart of `steps` (in start order): a row per source with readings."""
    title = "Host and device memory per step"
    description = (
        f"MiB after each step ({names.MEMORY_HOST_RSS}, {names.MEMORY_DEVICE_ALLOCATED}), and the expected line: the first reading plus "
        f"{names.MEMORY_KV_EXPECTED_BYTES_PER_TOKEN} times the growth of {names.STEP_KV_TOKENS} since it."
    )
    notes = []
    present = []
    for label, key, read in _SOURCES:
        if any(read(row) is not None for row in steps):
            present.append((label, key, read))
        else:
            notes.append(f"No {label.split(' ')[0]} memory readings ({key} absent from every step span: not readable on this device, or memory was not monitored).")
    per_token = next((row.kv_bytes_per_token for row in steps if row.kv_bytes_per_token is not None), None)
    if per_token is None:
        notes.append(f"No expected KV growth: the step spans carry no {names.MEMORY_KV_EXPECTED_BYTES_PER_TOKEN} (a trace from before it was recorded, or memory not monitored).")
    elif per_token == 0:
        notes.append("Expected KV growth 0 bytes per token: a KV cache allocated up front (serve's paged cache), whose use does not grow memory.")
    if not present:
        return Section("memory", title, description, notes=tuple(notes))
    figure = make_subplots(rows=len(present), cols=1, shared_xaxes=True, vertical_spacing=0.12, subplot_titles=[label for label, _, _ in present])
    for position, (label, _key, read) in enumerate(present, start=1):
        readings = [(row, read(row)) for row in steps if read(row) is not None]
        x = np.fromiter((row.index for row, _ in readings), dtype=np.int32, count=len(readings))
        mib = np.fromiter((value / MIB for _, value in readings), dtype=np.float64, count=len(readings))
        figure.add_trace(go.Scatter(x=x, y=mib, mode="lines", name=f"{label}", hovertemplate="step %{x}<br>%{y:.2f} MiB<extra></extra>"), row=position, col=1)
        expected = _expected_mib(readings, per_token)
        if expected is not None:
            figure.add_trace(
                go.Scatter(
                    x=x,
                    y=expected,
                    mode="lines",
                    line={"dash": "dash"},
                    name=f"{label}: first reading + expected KV growth ({per_token} bytes per token)",
                    hovertemplate="step %{x}<br>expected %{y:.2f} MiB<extra></extra>",
                ),
                row=position,
                col=1,
            )
        figure.update_yaxes(title_text="MiB", row=position, col=1)
    figure.update_xaxes(step_axis(len(steps)), row=len(present), col=1)
    figure.update_layout(template="plotly_white", height=300 * len(present) + 60, margin={"l": 60, "r": 20, "t": 40, "b": 50}, legend={"orientation": "h", "y": -0.25})
    return Section("memory", title, description, figure=figure, notes=tuple(notes))


def _expected_mib(readings: list[tuple[StepRow, int]], per_token: int | None) -> np.ndarray | None:
    """The first reading plus the KV growth since it; None when either figure is missing."""
    if per_token is None or any(row.kv_tokens is None for row, _ in readings):
        return None
    first_row, first_value = readings[0]
    return np.fromiter(((first_value + per_token * (row.kv_tokens - first_row.kv_tokens)) / MIB for row, _ in readings), dtype=np.float64, count=len(readings))
