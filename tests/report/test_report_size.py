"""The size of a long run's report: a 2,000-step trace gives a page under a stated bound, with
every step in it (nothing dropped to get there)."""

from __future__ import annotations

from plotly.offline import get_plotlyjs

from tests.report.conftest import LONG_RUN_STEPS, LongReport
from tests.report.synthetic_trace import SLOW_EVERY
from tracedoffload import names
from tracedoffload.tracing.exporters.jsonl import read_otlp_jsonl

# Beyond plotly.js itself (4.8 MB with plotly 7, inlined once): the README states the whole page's
# measured size, of which the data of 2,000 steps of 28 layers is about 1.3 MB.
MAX_DATA_BYTES = 1_500_000


def test_a_2000_step_report_stays_under_its_size_bound(long_report: LongReport):
    size = long_report.html.stat().st_size
    assert size - len(get_plotlyjs().encode()) < MAX_DATA_BYTES, f"{size:,} bytes"
    text = long_report.html.read_text()
    assert text.count(get_plotlyjs()[:200]) == 1  # plotly.js inlined once for the four charts
    # Every step is in the page: its trace id is in the latency chart's hover text.
    steps = [span for span in read_otlp_jsonl(long_report.trace) if span.name == names.SPAN_STEP]
    assert len(steps) == LONG_RUN_STEPS == long_report.live_stats["steps"]
    assert all(f"{span.trace_id:032x}" in text for span in steps)
    # The slow steps the synthetic run planted, found by the tail rule, are marked as such.
    slow = [span for span in steps if span.attributes[names.STEP_SAMPLED_BY] in names.SLOW_STEP_REASONS]
    assert len(slow) == (LONG_RUN_STEPS - 1) // SLOW_EVERY
    assert f"slow by the tail rule ({names.EVENT_SLOW_STEP})" in text
