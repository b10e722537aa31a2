"""The step axis the per-step charts share: titled by the attribute it shows, whole steps only."""

from __future__ import annotations

from typing import Any

from tracedoffload import names

# Up to this many steps, one tick per step: Plotly would otherwise tick a short run at 0.5, 1.5.
_EVERY_STEP_UP_TO = 20


def step_axis(step_count: int) -> dict[str, Any]:
    """Plotly x-axis settings for a chart of `step_count` steps."""
    axis: dict[str, Any] = {"title": {"text": f"step ({names.STEP_INDEX})"}}
    if step_count <= _EVERY_STEP_UP_TO:
        axis.update(tick0=0, dtick=1)
    return axis
