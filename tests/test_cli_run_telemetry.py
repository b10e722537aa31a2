"""`tracedoffload run`'s telemetry flags and environment: checked before the model loads, and what
the terminal shows while it runs."""

from __future__ import annotations

import json
import re

import pytest

from tests.servers import free_port
from tracedoffload.cli import main

MODEL_LOADED = "offload.attached"  # the first log line after the model is loaded and offloaded


def run_error_before_loading(capsys, *flags: str) -> str:
    """Run expecting exit 2 before any model work; return the error line."""
    assert main(["run", "--model", "random", "--max-new-tokens", "2", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert MODEL_LOADED not in err, "the model was loaded before the bad input was noticed"
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


class TestBadTelemetryInput:
    def test_trace_file_that_is_a_directory(self, capsys, tmp_path):
        assert "trace_file=" in run_error_before_loading(capsys, "--trace-file", str(tmp_path))

    def test_perfetto_file_that_is_a_directory(self, capsys, tmp_path):
        assert "perfetto=" in run_error_before_loading(capsys, "--no-trace-file", "--perfetto", str(tmp_path))

    def test_trace_file_under_a_file(self, capsys, tmp_path):
        blocker = tmp_path / "plain-file"
        blocker.write_text("")
        line = run_error_before_loading(capsys, "--trace-file", str(blocker / "run.jsonl"))
        assert "trace_file=" in line and "directory" in line

    def test_default_trace_directory_that_is_a_file(self, capsys, tmp_path, monkeypatch):
        """The default traces/run-<time>.otlp.jsonl is checked like a given path."""
        monkeypatch.chdir(tmp_path)
        (tmp_path / "traces").write_text("not a directory")
        assert "trace_file='traces/run-" in run_error_before_loading(capsys)

    @pytest.mark.parametrize("linger", ["inf", "nan", "-1", "100000"])
    def test_metrics_linger_out_of_range(self, capsys, linger):
        assert "metrics_linger=" in run_error_before_loading(capsys, "--no-trace-file", "--metrics-linger", linger)

    def test_slow_token_ms_not_a_positive_number(self, capsys):
        assert "slow_token_ms=" in run_error_before_loading(capsys, "--no-trace-file", "--slow-token-ms", "nan")

    def test_bad_protocol_in_the_environment(self, capsys, clean_otel_env):
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        assert "OTEL_EXPORTER_OTLP_PROTOCOL" in run_error_before_loading(capsys, "--no-trace-file")

    def test_malformed_endpoint_in_the_environment(self, capsys, clean_otel_env):
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "notaurl")
        assert "OTEL_EXPORTER_OTLP_ENDPOINT='notaurl'" in run_error_before_loading(capsys, "--no-trace-file")

    def test_malformed_endpoint_flag(self, capsys, clean_otel_env):
        assert "otlp_endpoint=" in run_error_before_loading(capsys, "--no-trace-file", "--otlp-endpoint", "collector")


class TestTelemetryEnvironment:
    def test_traces_exporter_none_turns_otlp_off(self, capsys, clean_otel_env):
        """OTEL_TRACES_EXPORTER=none wins over an endpoint: nothing is sent, so nothing is dropped."""
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
        clean_otel_env.setenv("OTEL_TRACES_EXPORTER", "none")
        assert main(["run", "--model", "random", "--max-new-tokens", "3", "--json", "--no-progress", "--no-trace-file"]) == 0
        assert json.loads(capsys.readouterr().out)["stats"]["dropped_spans"] == 0

    @pytest.mark.parametrize(("env", "service"), [({}, "tracedoffload"), ({"OTEL_SERVICE_NAME": "llm-gateway"}, "llm-gateway")])
    def test_service_name_is_searchable_by_default(self, capsys, clean_otel_env, tmp_path, env, service):
        """Spans carry service.name `tracedoffload` (what the README tells a Jaeger user to pick)
        unless OTEL_SERVICE_NAME names another; OTEL_RESOURCE_ATTRIBUTES are kept."""
        for key, value in env.items():
            clean_otel_env.setenv(key, value)
        clean_otel_env.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
        path = tmp_path / "run.jsonl"
        assert main(["run", "--model", "random", "--max-new-tokens", "2", "--no-progress", "--trace-file", str(path)]) == 0
        resources = [
            {item["key"]: item["value"]["stringValue"] for item in block["resource"]["attributes"] if "stringValue" in item["value"]}
            for line in path.read_text().splitlines()
            for block in json.loads(line)["resourceSpans"]
        ]
        assert resources and all(resource == resources[0] for resource in resources)
        resource = resources[0]
        assert resource["service.name"] == service
        assert resource["deployment.environment"] == "test"


class TestTerminalOutput:
    def test_progress_bar_counts_new_tokens_and_ends_its_line(self, capsys):
        """The bar counts to --max-new-tokens; profiling summaries and later log lines start on their own line."""
        assert main(["run", "--model", "random", "--max-new-tokens", "4", "--no-trace-file", "--progress", "--profile-every", "2"]) == 0
        err = capsys.readouterr().err
        bars = re.findall(r"\] (\d+)/(\d+) steps", err)
        assert bars and {total for _, total in bars} == {"4"}
        assert bars[-1][0] == "4"
        for line in err.splitlines():
            if "steps/s" in line:  # the bar's own line: only bar redraws on it
                assert line.replace("\r", "").startswith("[") and line.endswith("steps/s")
        assert err.count("\nprofiling summary") == 2
        assert re.search(r"\n\S+ \[info\s*\] offload\.detached", err)
