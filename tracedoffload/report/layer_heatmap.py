"""Per-layer time of every step: compute, transfer and wait as three heatmaps (steps x layers).

Drawn from the step spans' per-layer arrays, which every step carries whether or not its layer
spans were exported, so the heatmaps are complete at any sampling.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tracedoffload import names
from tracedoffload.report.section import Section
from tracedoffload.report.step_axis import step_axis
from tracedoffload.report.step_row import StepRow

# (title, the step span's array, the StepRow field holding it)
_ROWS = (
    ("compute ms", names.STEP_LAYERS_COMPUTE_NS, "layers_compute_ns"),
    ("transfer ms", names.STEP_LAYERS_TRANSFER_NS, "layers_transfer_ns"),
    ("wait ms (compute waiting for its copy)", names.STEP_LAYERS_WAIT_NS, "layers_wait_ns"),
)
_ROW_HEIGHT_PX = 230


def layer_heatmap_section(steps: list[StepRow]) -> Section:
    """The three heatmaps of `steps` (in start order); a row whose array no step carries is
    named as missing rather than drawn as zeros."""
    title = "Per-layer compute, transfer and wait"
    description = (
        f"Each step's time per decoder layer, from the step spans' {', '.join(key for _, key, _ in _ROWS)} arrays. "
        "Resident layers have no transfer and no wait."
    )
    present = [(label, key, field) for label, key, field in _ROWS if any(getattr(row, field) is not None for row in steps)]
    notes = tuple(f"No step span carries {key}: its heatmap is left out." for label, key, field in _ROWS if (label, key, field) not in present)
    if not present:
        return Section("layers", title, description, notes=notes)
    layers = max(len(getattr(row, field) or ()) for row in steps for _, _, field in present)
    x = np.fromiter((row.index for row in steps), dtype=np.int32, count=len(steps))
    figure = make_subplots(rows=len(present), cols=1, shared_xaxes=True, vertical_spacing=0.08, subplot_titles=[label for label, _, _ in present])
    for position, (label, _key, field) in enumerate(present, start=1):
        z = _matrix(steps, field, layers)
        axis = figure.layout["yaxis" if position == 1 else f"yaxis{position}"]
        low, high = axis.domain
        figure.add_trace(
            go.Heatmap(
                x=x,
                y=np.arange(layers, dtype=np.int32),
                z=z,
                colorscale="Viridis",
                # One colour bar per heatmap, beside it: their scales differ by orders of magnitude.
                colorbar={"y": (low + high) / 2, "len": high - low, "title": {"text": "ms"}, "thickness": 12},
                hovertemplate=f"step %{{x}}<br>layer %{{y}}<br>{label}: %{{z:.3f}}<extra></extra>",
                name=label,
            ),
            row=position,
            col=1,
        )
        figure.update_yaxes(title_text="layer", row=position, col=1)
    figure.update_xaxes(step_axis(len(steps)), row=len(present), col=1)
    figure.update_layout(template="plotly_white", height=_ROW_HEIGHT_PX * len(present) + 80, margin={"l": 60, "r": 20, "t": 40, "b": 50})
    return Section("layers", title, description, figure=figure, notes=notes)


def _matrix(steps: list[StepRow], field: str, layers: int) -> np.ndarray:
    """Milliseconds, one row per layer and one column per step; NaN (drawn blank) where a step
    does not carry the array. float32: packed in the page as 4 bytes a cell."""
    matrix = np.full((layers, len(steps)), np.nan, dtype=np.float32)
    for column, row in enumerate(steps):
        values = getattr(row, field)
        if values is not None:
            matrix[: len(values), column] = np.asarray(values, dtype=np.float64) / 1e6
    return matrix
