"""`tracedoffload` as a user runs it, in its own process: what start-up imports, Ctrl-C in the
middle of a generation, and a collector that is down at exit."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest


HEAVY_MODULES = ("torch", "transformers", "opentelemetry.sdk")
WHAT_WAS_IMPORTED = """
import sys
from tracedoffload.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exited:
    code = exited.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


def imported_after(*argv: str) -> tuple[list[str], str]:
    """Run the CLI with `argv` in a fresh interpreter; the heavy modules it imported, and stderr."""
    script = WHAT_WAS_IMPORTED.format(heavy=HEAVY_MODULES)
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300)
    marker = [line for line in done.stderr.splitlines() if line.startswith("HEAVY=")]
    assert marker, done.stderr[-2000:]
    heavy = marker[-1].removeprefix("HEAVY=")
    return (heavy.split(",") if heavy else []), done.stderr


class TestStartUp:
    @pytest.mark.parametrize(
        "argv",
        [["--help"], ["run", "--help"], ["plan", "--help"], ["report", "--help"], ["verify", "--help"], ["run", "--preset", "ludicrous"], ["verify", "--atol", "-1"],
         ["run", "--dtype", "int8"], ["run", "--max-new-tokens", "0"], ["report", "/no/such/file.jsonl"]],
        ids=lambda argv: " ".join(argv),
    )
    def test_help_and_argument_errors_import_nothing_heavy(self, argv):
        """Help and argument errors answer before torch, transformers or the OpenTelemetry SDK
        would be imported (seconds of start-up, more on a loaded host)."""
        heavy, _ = imported_after(*argv)
        assert heavy == []

    def test_a_bad_otel_variable_is_refused_before_anything_heavy(self, clean_otel_env):
        """An OTEL_* variable is checked without importing the SDK or the model's libraries."""
        clean_otel_env.setenv("OTEL_TRACES_EXPORTER", "nototlp")
        heavy, err = imported_after("run", "--model", "random")
        assert "OTEL_TRACES_EXPORTER='nototlp' is invalid" in err
        assert "torch" not in heavy and "transformers" not in heavy


def start_run(*flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "tracedoffload", "run", "--model", "random", "--json", "--no-progress", *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class TestCtrlC:
    def test_ctrl_c_stops_cleanly_with_the_summary_and_the_trace(self, tmp_path):
        """SIGINT mid-generation: no traceback, the summary of the tokens made so far, the trace
        file flushed (report reads the same count), exit status 130."""
        trace = tmp_path / "run.otlp.jsonl"
        process = start_run("--max-new-tokens", "100000", "--trace-file", str(trace))
        try:
            deadline = time.monotonic() + 240
            while not (trace.exists() and trace.stat().st_size > 0):  # tokens are being made
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
                time.sleep(0.1)
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=240)
        finally:
            process.kill()
        assert process.returncode == 130, err[-2000:]
        assert "Traceback" not in err
        summary = json.loads(out)
        assert summary["finish_reason"] == "interrupted" and 0 < summary["generated_tokens"] < 100000
        assert summary["stats"]["generated_tokens"] == summary["stats"]["steps"] == summary["generated_tokens"]
        report = subprocess.run([sys.executable, "-m", "tracedoffload", "report", str(trace), "--json"], capture_output=True, text=True, timeout=300)
        assert json.loads(report.stdout)["generated_tokens"] == summary["generated_tokens"]


class TestCollectorDown:
    def test_summary_first_then_a_bounded_flush_and_one_line(self, clean_otel_env, tmp_path):
        """A collector that accepts connections and never answers: the summary is printed in
        full, the exit flush keeps to --export-budget, and the loss is one line, with no SDK
        retry lines."""
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
            process = start_run("--max-new-tokens", "6", "--no-trace-file", "--otlp-endpoint", endpoint, "--export-budget", "1")
            out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        assert json.loads(out)["generated_tokens"] == 6
        assert err.count("tracing.spans_lost") == 1
        assert "Transient error" not in err and "retrying" not in err.lower()

    def test_the_budget_is_a_validated_flag(self, capsys):
        """--export-budget must be a positive number of seconds, at most 600."""
        from tracedoffload.cli import main

        for bad in ("0", "-1", "nan", "601"):
            assert main(["run", "--model", "random", "--export-budget", bad]) == 2
            assert "export_budget=" in capsys.readouterr().err
