"""The statistics table and the slowest steps, as `tracedoffload report FILE` prints them."""

from __future__ import annotations

import html
from typing import Any

from tracedoffload.report.section import Section
from tracedoffload.tracing.summary import slowest_steps, stats_table


def statistics_section(stats: dict[str, Any], slowest: int) -> Section:
    """The text of `report FILE` for these statistics, with the `slowest` slowest steps."""
    text = stats_table(stats) + "\n\n" + slowest_steps(stats, slowest)
    return Section(
        "statistics",
        "Statistics",
        "Aggregated from the step spans by the same code as the end of `tracedoffload run` and `tracedoffload report`.",
        body=f"<pre>{html.escape(text)}</pre>",
    )
