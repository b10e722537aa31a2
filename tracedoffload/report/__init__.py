"""The HTML report of a traced run: one self-contained page, drawn from the spans alone.

    digest.py          one pass over the spans: what every chart needs, and the statistics
    step_row.py        the figures of one step span that the charts read
    step_axis.py       the step axis the per-step charts share
    detailed_step.py   the layer spans of the slowest step that has them (the stream chart's)
    span_collector.py  a span exporter feeding a digest during `run --html` (no file read back)
    latency_chart.py, layer_heatmap.py, stream_gantt.py, memory_chart.py: one chart each
    offload_table.py, statistics_section.py: the configuration and the statistics table
    section.py         a titled part of the page: a chart, or what is missing and why
    page.py            the page: Plotly's JavaScript inlined once, every section after it
    output.py          where the page goes: checked before any work, written atomically
    dependency.py      plotly is an optional extra: checked before any work, named when missing

Nothing here imports plotly at import time but the chart modules and the page, which the command
line imports only when --html is given: `--help` and the text report stay fast.
"""
