"""Traces made once per session and shared (read-only) by the report's tests: real runs of the
random model, one at --trace-level layer that also wrote its own HTML report and one at
--trace-level token (no layer spans); and a 2,000-step trace from the synthetic run, with the
report `report --html` made of it."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from pathlib import Path

import pytest

from tests.report.synthetic_trace import write_synthetic_trace
from tracedoffload.cli import main

LONG_RUN_STEPS = 2000  # the size the README states the report's size and opening time for


@dataclasses.dataclass(frozen=True)
class TracedRun:
    trace: Path  # the run's OTLP JSON-lines file
    html: Path | None  # the report `run --html` wrote, if asked
    summary: dict  # what `run --json` printed


def traced_run(directory: Path, *flags: str, html: bool = False) -> TracedRun:
    """`tracedoffload run --model random` in `directory` (3 new tokens), its trace written to a file."""
    trace, page = directory / "run.otlp.jsonl", directory / "run.html"
    argv = ["run", "--model", "random", "--max-new-tokens", "3", "--json", "--no-progress", "--trace-file", str(trace), *flags]
    if html:
        argv += ["--html", str(page)]
    out = io.StringIO()
    previous = Path.cwd()
    os.chdir(directory)  # nothing the run writes lands in the checkout
    try:
        with contextlib.redirect_stdout(out):
            assert main(argv) == 0
    finally:
        os.chdir(previous)
    return TracedRun(trace, page if html else None, json.loads(out.getvalue()))


@pytest.fixture(scope="session")
def layer_run(tmp_path_factory: pytest.TempPathFactory) -> TracedRun:
    """A run at the default --trace-level layer (its first steps' layer spans exported), with
    `--html`: its trace file and its own report."""
    return traced_run(tmp_path_factory.mktemp("layer-run"), html=True)


@pytest.fixture(scope="session")
def token_run(tmp_path_factory: pytest.TempPathFactory) -> TracedRun:
    """A run at --trace-level token: step spans, no layer spans."""
    return traced_run(tmp_path_factory.mktemp("token-run"), "--trace-level", "token")


@dataclasses.dataclass(frozen=True)
class LongReport:
    trace: Path
    html: Path
    live_stats: dict  # what the pipeline aggregated as it went


@pytest.fixture(scope="session")
def long_report(tmp_path_factory: pytest.TempPathFactory) -> LongReport:
    """A 2,000-step trace (tests/report/synthetic_trace.py) and its page from `report --html`."""
    directory = tmp_path_factory.mktemp("long-run")
    trace, page = directory / "long.otlp.jsonl", directory / "long.html"
    live = write_synthetic_trace(trace, steps=LONG_RUN_STEPS)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(trace), "--html", str(page), "--json"]) == 0
    return LongReport(trace, page, live)
