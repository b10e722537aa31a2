"""`Section`: one titled part of the page, holding a chart, ready HTML, or only the reason it has
neither (a chart that lacks data says so instead of drawing something invented)."""

from __future__ import annotations

import dataclasses
import html
from typing import Any

# No Plotly logo link in the mode bar: the page links nowhere and makes no request of its own.
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


@dataclasses.dataclass(frozen=True)
class Section:
    """A part of the page.

    Fields:
        key: its id in the page (`section-<key>`, its chart `chart-<key>`).
        title: the heading.
        description: what it shows and where the figures come from (plain text).
        figure: a plotly Figure, or None.
        body: ready HTML (escaped by whoever built it), or None.
        notes: what is missing or worth knowing before reading it (plain text), shown first.
    """

    key: str
    title: str
    description: str
    figure: Any = None
    body: str | None = None
    notes: tuple[str, ...] = ()

    def to_html(self) -> str:
        """The section's HTML; Plotly's JavaScript is the page's, loaded once before it."""
        parts = [f'<section id="section-{self.key}">', f"<h2>{html.escape(self.title)}</h2>", f'<p class="description">{html.escape(self.description)}</p>']
        parts += [f'<p class="note">{html.escape(note)}</p>' for note in self.notes]
        if self.figure is not None:
            parts.append(self.figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{self.key}", config=PLOTLY_CONFIG))
        if self.body is not None:
            parts.append(self.body)
        parts.append("</section>")
        return "\n".join(parts)
