"""The report page: Plotly's JavaScript inlined once in the head, then one section per chart and
table. The file opens offline: no CDN, no font, no request of any kind."""

from __future__ import annotations

import datetime
import html
from pathlib import Path
from typing import Any

from plotly.offline import get_plotlyjs

from tracedoffload import names
from tracedoffload._exceptions import TracedOffloadError
from tracedoffload.report.digest import TraceDigest
from tracedoffload.report.latency_chart import latency_section
from tracedoffload.report.layer_heatmap import layer_heatmap_section
from tracedoffload.report.memory_chart import memory_section
from tracedoffload.report.offload_table import offload_section
from tracedoffload.report.output import write_atomically
from tracedoffload.report.statistics_section import statistics_section
from tracedoffload.report.stream_gantt import stream_section
from tracedoffload.tracing.stats import SLOWEST_KEPT

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
p.description { color: #555; } p.note { background: #fff6e0; border-left: 4px solid #e0a800; padding: 0.4em 0.8em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
table.config th { text-align: left; font-weight: normal; color: #555; padding-right: 2em; }
table.config td { font-family: monospace; }
"""


def build_page(digest: TraceDigest, source: str, slowest: int = SLOWEST_KEPT) -> str:
    """The whole page for the spans in `digest`; `source` names where they came from (a file or
    a run) in the heading.

    Raises:
        TracedOffloadError: the spans hold no step span (there is nothing to draw).
    """
    stats = digest.statistics()
    steps = digest.steps_in_order()
    if not steps:
        raise TracedOffloadError(f"{source} holds no step spans: the report needs a trace written at --trace-level token or layer")
    slowest_step = max(steps, key=lambda row: row.duration_ns)
    sections = [
        latency_section(steps, stats),
        layer_heatmap_section(steps),
        stream_section(digest.detailed, slowest_step, digest.copy_stream),
        memory_section(steps),
        offload_section(digest.offload, list(digest.models)),
        statistics_section(stats, slowest),
    ]
    title = f"tracedoffload report: {source}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_STYLE}</style>",
            # Once for the page, not once per chart: it is 4.8 MB (plotly 7).
            f'<script type="text/javascript">{get_plotlyjs()}</script>',
            "</head>",
            "<body>",
            f"<h1>{html.escape(title)}</h1>",
            f'<p class="summary">{html.escape(_summary(stats, steps))}</p>',
            *_file_notes(steps),
            *(section.to_html() for section in sections),
            "</body>",
            "</html>",
        ]
    )


def write_report(path: Path, digest: TraceDigest, source: str, slowest: int = SLOWEST_KEPT) -> int:
    """Build the page and write it to `path` atomically; returns its size in bytes.

    Raises:
        TracedOffloadError: no step spans, or the file cannot be written (naming `html`).
    """
    return write_atomically(path, build_page(digest, source, slowest))


def _file_notes(steps: list[Any]) -> list[str]:
    """What the reader should know about the file before the charts."""
    if len({row.index for row in steps}) < len(steps):
        # Each session counts its steps from 0: two runs in one file (`run --append`) share indices.
        note = f"{names.STEP_INDEX} repeats in these spans: they hold more than one run (a trace file written with --append), which the per-step charts draw over each other."
        return [f'<p class="note">{html.escape(note)}</p>']
    return []


def _summary(stats: dict[str, Any], steps: list[Any]) -> str:
    first, last = steps[0], steps[-1]
    span_s = (last.start_ns + last.duration_ns - first.start_ns) / 1e9
    started = datetime.datetime.fromtimestamp(first.start_ns / 1e9, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"{stats['steps']} steps ({', '.join(f'{n} {phase}' for phase, n in stats['steps_by_phase'].items())}) "
        f"serving {stats['generations']} generation(s), {stats['generated_tokens']} tokens generated, "
        f"from {started} over {span_s:.3f} s; step latency p50 {stats['step_latency_ms']['p50']:.3f} ms, "
        f"max {stats['step_latency_ms']['max']:.3f} ms."
    )
