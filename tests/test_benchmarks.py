"""The benchmark scripts run and print their ratios (figures only: nothing here is timed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
RATIO = r"(\d+\.\d{4})"


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize(
    ("script", "patterns"),
    [
        ("bench_offload.py", [rf"\(b\) / \(\(a\) \+ \(c\)\)\s+= {RATIO}"]),
        ("bench_tracing.py", [rf"generation:\n  full    / off = {RATIO}", rf"generation \+ flush:\n  full    / off = [\d.]+ .*\n  default / off = {RATIO}"]),
        ("bench_telemetry_cpu.py", [rf"full   : telemetry \+ export CPU / model CPU = {RATIO}"]),
        ("bench_background_cpu.py", [rf"thread   / off = {RATIO}", rf"nogil    / off = {RATIO}", rf"process  / off = {RATIO}"]),
        ("bench_advise.py", [rf"A predicted / measured = {RATIO}", rf"B predicted / measured = {RATIO}", rf"C predicted / measured = {RATIO}"]),
    ],
)
def test_benchmark_prints_its_ratios(script: str, patterns: list[str]) -> None:
    """A smoke test: each benchmark runs (on the random model) and prints its ratios."""
    output = _run(script, "--rounds", "1", "--tokens", "4", "--model", "random")
    for pattern in patterns:
        match = re.search(pattern, output)
        assert match, f"{script} did not print {pattern!r}:\n{output}"
        assert 0.0 < float(match.group(1)) < 100.0


def test_default_model_benchmark_prints_its_ratios() -> None:
    """A smoke test: the default model's benchmark converts, loads from its cache and prints its ratios."""
    output = _run("bench_default_model.py", "--load-rounds", "1", "--rounds", "1", "--tokens", "4")
    for pattern in (rf"cached / first = {RATIO}", rf"balanced       / resident = {RATIO}", rf"resident, FTZ  / resident = {RATIO}"):
        match = re.search(pattern, output)
        assert match, f"bench_default_model.py did not print {pattern!r}:\n{output}"
        assert 0.0 < float(match.group(1)) < 100.0


def test_telemetry_cpu_benchmark_runs_batched() -> None:
    """A smoke test: --batch divides the figures by the sequences each forward serves."""
    output = _run("bench_telemetry_cpu.py", "--rounds", "1", "--tokens", "4", "--batch", "2", "--model", "random")
    assert "x batch 2," in output
    match = re.search(rf"full   : telemetry \+ export CPU / model CPU = {RATIO}", output)
    assert match and 0.0 < float(match.group(1)) < 100.0


def test_serve_benchmark_prints_its_ratios() -> None:
    """A smoke test: the server starts, takes the openai client's load at 1, 4 and 16 requests at
    once, and the benchmark prints its two ratios."""
    output = _run("bench_serve.py", "--rounds", "1", "--max-tokens", "4")
    for pattern in (rf"\(a\) throughput at 16 / at 1 = {RATIO}", rf"\(b\) host-to-device bytes per generated token at 16 / at 1 = {RATIO}", rf"\(d\) telemetry CPU / engine thread CPU at 16 = {RATIO}"):
        match = re.search(pattern, output)
        assert match, f"bench_serve.py did not print {pattern!r}:\n{output}"
        assert 0.0 < float(match.group(1)) < 100.0
