"""plotly, the optional dependency of the HTML report (the `report` extra)."""

from __future__ import annotations

import importlib.util

from tracedoffload._exceptions import TracedOffloadError

EXTRA = "report"


def require_plotly() -> None:
    """Check that plotly can be imported, without importing it (that takes a second).

    Raises:
        TracedOffloadError: plotly is not installed; the message names the extra to install.
    """
    if importlib.util.find_spec("plotly") is None:
        raise TracedOffloadError(f"--html needs the plotly package, which is not installed: pip install 'tracedoffload[{EXTRA}]'")
