"""The HTML report in a real browser: headless Chromium (installed from Debian's archive by the
test when missing) opens the file offline, logs no error, asks for nothing but the file itself,
draws every chart, and a screenshot of the page is not blank."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.browser import chromium, visit
from tests.png_pixels import distinct_colours, png_pixels
from tests.report.conftest import LONG_RUN_STEPS, LongReport, TracedRun

SCREENSHOT_FOR_THE_LEAD = Path("/tmp/report-screenshot.png")
CHARTS = ["chart-latency", "chart-layers", "chart-streams", "chart-memory"]
# A blank or single-colour page has a handful of colours; charts with colour scales have thousands.
MIN_DISTINCT_COLOURS = 500


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    with chromium(tmp_path_factory.mktemp("chromium") / "profile") as devtools:
        yield devtools


def assert_loaded_cleanly(page_visit, page: Path) -> None:
    """No error of any kind, and no request but the page's own file and the data: URLs Plotly
    makes for its heatmap images (inline data, not a fetch)."""
    assert page_visit.errors == []
    assert page_visit.requests[0] == page_visit.url
    assert [url for url in page_visit.requests if url != page_visit.url and not url.startswith("data:")] == []


def assert_every_chart_drawn(page_visit) -> None:
    assert [chart["id"] for chart in page_visit.charts] == CHARTS
    for chart in page_visit.charts:
        assert chart["main_svgs"] > 0, chart
        assert chart["traces"] > 0, chart
        assert chart["drawn"] > 0, chart  # lines, markers, bars or heatmap images actually in the DOM
        assert chart["width"] > 300 and chart["height"] > 200, chart


def test_the_run_report_renders_in_chromium(browser, layer_run: TracedRun, tmp_path):
    """The page `run --html` wrote: loads offline and cleanly, every chart drawn, the screenshot
    of the whole page has many colours (saved beside the test and for the lead at
    /tmp/report-screenshot.png)."""
    page_visit = visit(browser, layer_run.html, expected_charts=len(CHARTS))
    assert_loaded_cleanly(page_visit, layer_run.html)
    assert_every_chart_drawn(page_visit)
    # The charts' own drawn data: one latency point per step (a line and its markers).
    latency = page_visit.charts[0]
    assert latency["drawn"] >= layer_run.summary["stats"]["steps"]
    assert "No device memory readings" in page_visit.text
    screenshot = tmp_path / "report-screenshot.png"
    screenshot.write_bytes(page_visit.screenshot_png)
    shutil.copyfile(screenshot, SCREENSHOT_FOR_THE_LEAD)
    pixels = png_pixels(page_visit.screenshot_png)
    assert pixels.shape[1] >= 1200 and pixels.shape[0] > 2000  # the whole page, not the viewport only
    assert distinct_colours(pixels) >= MIN_DISTINCT_COLOURS


def test_a_2000_step_report_renders_in_chromium(browser, long_report: LongReport):
    """The page of a 2,000-step trace (the size the README states) draws every chart as well."""
    page_visit = visit(browser, long_report.html, expected_charts=len(CHARTS))
    assert_loaded_cleanly(page_visit, long_report.html)
    assert_every_chart_drawn(page_visit)
    assert page_visit.charts[0]["drawn"] >= LONG_RUN_STEPS
