"""The HTML report's content, from real runs' traces: what each section shows, and what it says
when the trace lacks the data for it."""

from __future__ import annotations

import json
import re

import pytest

from tests.report.conftest import TracedRun
from tracedoffload import names
from tracedoffload.cli import main
from tracedoffload.tracing.exporters.jsonl import read_otlp_jsonl

CHARTS = ("latency", "layers", "streams", "memory")


def report_html(capsys, trace, out, *flags: str) -> str:
    """`report TRACE --html OUT`: exit 0, the page's text."""
    assert main(["report", str(trace), "--html", str(out), *flags]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.err
    return out.read_text()


def statistics_block(page: str) -> str:
    return re.search(r'<section id="section-statistics">.*?<pre>(.*?)</pre>', page, re.DOTALL).group(1)


def chart_ids(page: str) -> list[str]:
    return re.findall(r'<div id="chart-([a-z]+)" class="plotly-graph-div"', page)


class TestRunAndFileReports:
    def test_run_html_and_report_html_show_the_same_statistics(self, capsys, tmp_path, layer_run: TracedRun):
        """The run's own report (spans collected as exported) and the report of its trace file
        (spans read back) hold the same statistics, which are the run's live ones."""
        from_run = layer_run.html.read_text()
        from_file = report_html(capsys, layer_run.trace, tmp_path / "file.html")
        assert statistics_block(from_run) == statistics_block(from_file)
        live = layer_run.summary["stats"]
        assert f"{live['steps']}  (" in statistics_block(from_run)
        assert live["slowest_steps"][0]["trace_id"] in statistics_block(from_run)

    def test_every_chart_is_drawn_from_a_layer_level_trace(self, layer_run: TracedRun):
        page = layer_run.html.read_text()
        assert chart_ids(page) == list(CHARTS)
        assert page.count("<script") == 1 + len(CHARTS)  # plotly.js once, then one call per chart
        assert "cdn.plot.ly/plotly" not in page.split("<body>")[1]  # no script loaded from a CDN

    def test_every_step_trace_id_is_in_the_latency_hover_text(self, layer_run: TracedRun):
        page = layer_run.html.read_text()
        steps = [span for span in read_otlp_jsonl(layer_run.trace) if span.name == names.SPAN_STEP]
        assert len(steps) == layer_run.summary["stats"]["steps"]
        for span in steps:
            assert f"{span.trace_id:032x}" in page

    def test_the_stream_chart_draws_the_slowest_steps_layer_spans(self, layer_run: TracedRun):
        """At the default sampling every step of a 3-token run has layer detail (the first
        steps), so the slowest step itself is drawn, with all of its layer spans."""
        slowest = layer_run.summary["stats"]["slowest_steps"][0]
        spans = list(read_otlp_jsonl(layer_run.trace))
        step = next(s for s in spans if s.name == names.SPAN_STEP and f"{s.trace_id:032x}" == slowest["trace_id"])
        layer_spans = [s for s in spans if s.parent_span_id == step.span_id]
        assert layer_spans
        page = layer_run.html.read_text()
        assert f"Step {slowest['step_index']} ({slowest['phase']}, " in page
        assert f"trace {slowest['trace_id']}: {len(layer_spans)} layer spans." in page

    def test_a_cpu_run_says_it_has_no_device_memory_and_draws_the_expected_kv_growth(self, layer_run: TracedRun):
        page = layer_run.html.read_text()
        assert "No device memory readings" in page
        step = next(s for s in read_otlp_jsonl(layer_run.trace) if s.name == names.SPAN_STEP)
        per_token = step.attributes[names.MEMORY_KV_EXPECTED_BYTES_PER_TOKEN]
        assert per_token > 0
        assert f"first reading + expected KV growth ({per_token} bytes per token)" in page

    def test_the_offload_configuration_is_the_step_spans(self, layer_run: TracedRun):
        page = layer_run.html.read_text()
        step = next(s for s in read_otlp_jsonl(layer_run.trace) if s.name == names.SPAN_STEP)
        table = re.search(r'<table class="config">(.*?)</table>', page, re.DOTALL).group(1)
        for key in (names.OFFLOAD_DEVICE, names.OFFLOAD_GPU_LAYERS, names.OFFLOAD_CPU_LAYERS, names.OFFLOAD_PREFETCH, names.OFFLOAD_RESIDENCY):
            assert f"<tr><th>{key}</th><td>{step.attributes[key]}</td></tr>" in table


class TestMissingData:
    def test_a_token_level_trace_says_it_has_no_layer_spans(self, capsys, tmp_path, token_run: TracedRun):
        """Without layer spans the stream chart is not drawn (nor made up from the per-layer
        sums): the page says why. The heatmaps still are (the step spans carry the arrays)."""
        page = report_html(capsys, token_run.trace, tmp_path / "token.html")
        assert chart_ids(page) == ["latency", "layers", "memory"]
        assert f"No layer spans in this trace ({names.STEP_LAYER_DETAIL} is false on every step)" in page

    def test_a_trace_without_the_expected_kv_figure_says_so(self, capsys, tmp_path, layer_run: TracedRun):
        """A trace written before the step spans carried the expected KV bytes per token: memory
        is drawn, the expected line is not, and the page names the missing attribute."""
        older = tmp_path / "older.otlp.jsonl"
        key = json.dumps(names.MEMORY_KV_EXPECTED_BYTES_PER_TOKEN)
        lines = layer_run.trace.read_text().splitlines()
        older.write_text("\n".join(re.sub(r',\{"key":' + re.escape(key) + r',"value":\{"intValue":"\d+"\}\}', "", line) for line in lines) + "\n")
        assert key not in older.read_text()
        page = report_html(capsys, older, tmp_path / "older.html")
        assert "memory" in chart_ids(page)
        assert f"No expected KV growth: the step spans carry no {names.MEMORY_KV_EXPECTED_BYTES_PER_TOKEN}" in page
        assert "expected KV growth (" not in page

    def test_two_runs_in_one_file_are_named_as_such(self, capsys, tmp_path, layer_run: TracedRun, token_run: TracedRun):
        """Two runs' lines in one file (what `run --append` writes): the page says the step
        indices repeat; a single run's page does not."""
        both = tmp_path / "appended.otlp.jsonl"
        both.write_text(layer_run.trace.read_text() + token_run.trace.read_text())
        note = f"{names.STEP_INDEX} repeats in these spans: they hold more than one run"
        assert note in report_html(capsys, both, tmp_path / "appended.html")
        assert note not in layer_run.html.read_text()

    @pytest.mark.parametrize("flag", ["--json", None])
    def test_report_still_prints_the_statistics_with_html(self, capsys, tmp_path, layer_run: TracedRun, flag):
        argv = ["report", str(layer_run.trace), "--html", str(tmp_path / "r.html"), *([flag] if flag else [])]
        assert main(argv) == 0
        out = capsys.readouterr().out
        if flag:
            assert json.loads(out)["steps"] == layer_run.summary["stats"]["steps"]
        else:
            assert "offload statistics (from spans)" in out
