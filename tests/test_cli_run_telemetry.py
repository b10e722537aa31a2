"""`tracedoffload run`'s telemetry flags and environment: checked before the model loads, and what
the terminal shows while it runs."""

from __future__ import annotations

import json
import re

import pytest

from tests.servers import free_port
from tracedoffload.cli import main

# Each test in its own directory: the default traces/ of a run lands there, not in the checkout.
pytestmark = pytest.mark.usefixtures("in_tmp_dir")

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
        assert "--slow-token-ms=nan" in run_error_before_loading(capsys, "--no-trace-file", "--slow-token-ms", "nan")

    @pytest.mark.parametrize(("flag", "value"), [("--sample-every", "0"), ("--first-tokens", "-1"), ("--relative-p95", "0")])
    def test_sampling_flags_are_named_as_typed(self, capsys, flag, value):
        """The sampling policy's own field names (every_n, ...) never reach the user."""
        assert f"{flag}={value}" in run_error_before_loading(capsys, "--no-trace-file", flag, value).replace("'", "")

    def test_bad_protocol_in_the_environment(self, capsys, clean_otel_env):
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        assert "OTEL_EXPORTER_OTLP_PROTOCOL" in run_error_before_loading(capsys, "--no-trace-file")

    def test_malformed_endpoint_in_the_environment(self, capsys, clean_otel_env):
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "notaurl")
        assert "OTEL_EXPORTER_OTLP_ENDPOINT='notaurl'" in run_error_before_loading(capsys, "--no-trace-file")

    def test_malformed_endpoint_flag(self, capsys, clean_otel_env):
        assert "otlp_endpoint=" in run_error_before_loading(capsys, "--no-trace-file", "--otlp-endpoint", "collector")


class TestOtelVariablesRefused:
    @pytest.mark.parametrize(
        ("variable", "value"),
        [
            ("OTEL_EXPORTER_OTLP_HEADERS", "garbage,,=x"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "authorization"),
            ("OTEL_RESOURCE_ATTRIBUTES", "garbage;;=="),
            ("OTEL_RESOURCE_ATTRIBUTES", "a=1,,b=2"),
            ("OTEL_TRACES_EXPORTER", "bogus"),
            ("OTEL_TRACES_EXPORTER", "nototlp"),
            ("OTEL_TRACES_EXPORTER", "otlp,none"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
            ("OTEL_METRICS_EXPORTER", "prometheus"),
            ("OTEL_LOGS_EXPORTER", "otlp"),
            ("OTEL_SDK_DISABLED", "yes"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli"),
        ],
    )
    def test_a_value_the_specification_does_not_allow(self, capsys, clean_otel_env, variable, value):
        """Each one is one error line naming the variable and its value, before the model loads."""
        clean_otel_env.setenv(variable, value)
        line = run_error_before_loading(capsys, "--no-trace-file")
        assert f"{variable}={value!r} is invalid: " in line

    def test_an_endpoint_flag_with_the_sdk_disabled(self, capsys, clean_otel_env):
        """--otlp-endpoint contradicts OTEL_SDK_DISABLED=true: refused, not silently dropped."""
        clean_otel_env.setenv("OTEL_SDK_DISABLED", "true")
        line = run_error_before_loading(capsys, "--no-trace-file", "--otlp-endpoint", f"http://127.0.0.1:{free_port()}")
        assert "otlp_endpoint=" in line and "OTEL_SDK_DISABLED" in line


class TestTraceFileReuse:
    def test_an_existing_trace_file_is_refused_without_append(self, capsys, tmp_path):
        """A second run into the same file is refused (it would read back as one run with two
        prefills); --append adds it, and report then says it read two generations."""
        path = tmp_path / "run.otlp.jsonl"
        flags = ["run", "--model", "random", "--max-new-tokens", "3", "--no-progress", "--trace-file", str(path)]
        assert main(flags) == 0
        capsys.readouterr()
        size = path.stat().st_size
        line = run_error_before_loading(capsys, "--trace-file", str(path))
        assert "trace_file=" in line and "--append" in line
        assert path.stat().st_size == size
        assert main([*flags, "--append"]) == 0
        capsys.readouterr()
        assert main(["report", str(path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["steps"] == 6


class TestTelemetryEnvironment:
    def test_sdk_disabled_means_no_default_trace_file_and_no_otlp(self, capsys, clean_otel_env, tmp_path, monkeypatch):
        """OTEL_SDK_DISABLED=true: nothing leaves the process (no OTLP even with an endpoint set,
        no default trace file); the statistics are still there."""
        monkeypatch.chdir(tmp_path)
        clean_otel_env.setenv("OTEL_SDK_DISABLED", "TRUE")
        clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
        assert main(["run", "--model", "random", "--max-new-tokens", "3", "--json", "--no-progress"]) == 0
        captured = capsys.readouterr()
        summary = json.loads(captured.out)
        assert summary["trace_file"] is None and not (tmp_path / "traces").exists()
        assert summary["stats"]["steps"] == 3 and summary["stats"]["dropped_spans"] == 0

    def test_console_traces_exporter_writes_spans_to_stderr(self, capsys, clean_otel_env):
        """OTEL_TRACES_EXPORTER=console prints each span (the SDK's console exporter) on stderr,
        keeping stdout for the summary."""
        clean_otel_env.setenv("OTEL_TRACES_EXPORTER", "console")
        assert main(["run", "--model", "random", "--max-new-tokens", "2", "--json", "--no-progress", "--no-trace-file"]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)["generated_tokens"] == 2
        assert '"name": "step"' in captured.err
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
        bars = re.findall(r"\] (\d+)/(\d+) tokens", err)
        assert bars and {total for _, total in bars} == {"4"}
        assert bars[-1][0] == "4"
        for line in err.splitlines():
            if "tokens/s" in line:  # the bar's own line: only bar redraws on it
                assert line.replace("\r", "").startswith("[") and line.endswith("tokens/s")
        assert err.count("\nprofiling summary") == 2
        assert re.search(r"\n\S+ \[info\s*\] offload\.detached", err)
