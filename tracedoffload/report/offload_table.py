"""The offload configuration, as the step spans carry it (`tracedoffload.offload.*`)."""

from __future__ import annotations

import html
from typing import Any

from tracedoffload import names
from tracedoffload.report.section import Section

_BYTES = frozenset((names.OFFLOAD_OFFLOADED_BYTES, names.OFFLOAD_DEVICE_POOL_BYTES, names.OFFLOAD_PINNED_BYTES))


def offload_section(offload: dict[str, Any], models: list[str]) -> Section:
    """A table of the `tracedoffload.offload.*` attributes (from the last step span that carries
    each) and the models the generations ran."""
    title = "Offload configuration"
    description = "The tracedoffload.offload.* attributes of the step spans, and the model named by the generation spans."
    rows = [(names.GEN_AI_REQUEST_MODEL, ", ".join(models))] if models else []
    rows += [(key, _value(key, value)) for key, value in offload.items()]
    if not rows:
        return Section("offload", title, description, notes=("The step spans carry no tracedoffload.offload.* attribute.",))
    cells = "\n".join(f"<tr><th>{html.escape(key)}</th><td>{html.escape(value)}</td></tr>" for key, value in rows)
    return Section("offload", title, description, body=f'<table class="config">\n{cells}\n</table>')


def _value(key: str, value: Any) -> str:
    if key in _BYTES and isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,} bytes ({value / 2**20:.1f} MiB)"
    return str(value)
