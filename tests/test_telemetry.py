"""Telemetry as a library: settings resolved argument -> environment -> default and checked;
one context manager that traces, measures and flushes; `run` built on it."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch

from tracedoffload import ConfigError, OffloadConfig, names, offload
from tracedoffload.cli import main
from tracedoffload.telemetry import Telemetry, TelemetrySettings
from tracedoffload.tracing.exporters.jsonl import read_otlp_jsonl
from tracedoffload.tracing.sampling import SamplingPolicy
from tests.tracing.conftest import tiny_model


class TestResolve:
    def test_defaults(self, monkeypatch):
        for variable in ("TRACEDOFFLOAD_TRACE_LEVEL", "TRACEDOFFLOAD_TRACE_FILE", "TRACEDOFFLOAD_METRICS_PORT", "TRACEDOFFLOAD_METRICS_ADDR", "TRACEDOFFLOAD_EXPORT_BUDGET"):
            monkeypatch.delenv(variable, raising=False)
        settings = TelemetrySettings.resolve()
        assert (settings.sampling.level, settings.trace_file, settings.metrics_port, settings.metrics_addr, settings.export_budget_s) == ("layer", None, None, "127.0.0.1", 5.0)

    def test_the_environment_fills_what_no_argument_gives(self, monkeypatch, tmp_path):
        monkeypatch.setenv("TRACEDOFFLOAD_TRACE_LEVEL", "token")
        monkeypatch.setenv("TRACEDOFFLOAD_TRACE_FILE", str(tmp_path / "env.jsonl"))
        monkeypatch.setenv("TRACEDOFFLOAD_EXPORT_BUDGET", "2.5")
        settings = TelemetrySettings.resolve()
        assert (settings.sampling.level, settings.trace_file, settings.export_budget_s) == ("token", tmp_path / "env.jsonl", 2.5)

    def test_an_argument_beats_the_environment(self, monkeypatch, tmp_path):
        monkeypatch.setenv("TRACEDOFFLOAD_TRACE_LEVEL", "token")
        monkeypatch.setenv("TRACEDOFFLOAD_EXPORT_BUDGET", "2.5")
        settings = TelemetrySettings.resolve(trace_level="generation", export_budget_s=9)
        assert (settings.sampling.level, settings.export_budget_s) == ("generation", 9.0)

    @pytest.mark.parametrize(
        "variable, value",
        [("TRACEDOFFLOAD_TRACE_LEVEL", "verbose"), ("TRACEDOFFLOAD_METRICS_PORT", "http"), ("TRACEDOFFLOAD_METRICS_PORT", "70000"), ("TRACEDOFFLOAD_EXPORT_BUDGET", "0"), ("TRACEDOFFLOAD_EXPORT_BUDGET", "nan")],
    )
    def test_a_bad_variable_is_named(self, monkeypatch, variable, value):
        """A value from the environment that is not valid names the variable, not a field the
        user never typed."""
        monkeypatch.setenv(variable, value)
        with pytest.raises(ConfigError, match=variable):
            TelemetrySettings.resolve()

    def test_bad_arguments_are_named(self, tmp_path):
        with pytest.raises(ConfigError, match="trace_level"):
            TelemetrySettings.resolve(trace_level="all")
        with pytest.raises(ConfigError, match="perfetto"):
            TelemetrySettings.resolve(perfetto=tmp_path)  # a directory
        with pytest.raises(ConfigError, match="inject_leak"):
            TelemetrySettings.resolve(inject_leak="gpu")
        existing = tmp_path / "old.jsonl"
        existing.write_text("")
        with pytest.raises(ConfigError, match="trace_file"):
            TelemetrySettings.resolve(trace_file=existing)


class TestTheContextManager:
    def test_traces_measures_and_flushes(self, tmp_path):
        """One block: the trace file holds the steps and the generation, the metrics endpoint
        served the run's figures while it ran, the statistics are kept after it."""
        settings = TelemetrySettings.resolve(trace_file=tmp_path / "t.jsonl", metrics_port=0, sampling=SamplingPolicy(level="token"))
        model = tiny_model()
        offloader = offload(model, OffloadConfig(num_layers_on_gpu=3))
        with Telemetry(settings, offloader, "tiny", 1024) as telemetry:
            with torch.inference_mode(), telemetry.session.generation("tiny", 5) as handle:
                model.generate(torch.arange(5).unsqueeze(0), max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
                handle.output_tokens = 4
            telemetry.session.drain(10)
            with urllib.request.urlopen(f"http://127.0.0.1:{telemetry.metrics_port}/metrics", timeout=5) as response:
                exposition = response.read().decode()
        offloader.detach()
        assert f"{names.STEPS.prometheus} 4.0" in exposition.replace('{model="tiny"}', "")
        assert telemetry.stats["steps"] == 4 and telemetry.stats["generations"] == 1
        spans = list(read_otlp_jsonl(tmp_path / "t.jsonl"))
        assert sum(s.name == names.SPAN_STEP for s in spans) == 4
        assert sum(s.name.startswith(names.GEN_AI_OPERATION) for s in spans) == 1
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{telemetry.metrics_port}/metrics", timeout=2)  # closed on exit
        telemetry.close()  # idempotent

    def test_trace_level_off_attaches_nothing(self):
        model = tiny_model()
        offloader = offload(model, OffloadConfig(num_layers_on_gpu=3))
        with Telemetry(TelemetrySettings.resolve(trace_level="off"), offloader, "tiny", 1024) as telemetry:
            assert telemetry.session is None
            assert not offloader.timeline.wants_markers
        offloader.detach()
        assert telemetry.stats is None


class TestRunUsesIt:
    def test_run_reads_the_trace_level_from_the_environment(self, monkeypatch, capsys):
        monkeypatch.setenv("TRACEDOFFLOAD_TRACE_LEVEL", "off")
        assert main(["run", "--model", "random", "--max-new-tokens", "2", "--json", "--no-progress"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["stats"] is None and summary["trace_file"] is None

    def test_a_flag_beats_the_environment(self, monkeypatch, capsys, tmp_path):
        monkeypatch.setenv("TRACEDOFFLOAD_TRACE_LEVEL", "off")
        path = tmp_path / "run.jsonl"
        assert main(["run", "--model", "random", "--max-new-tokens", "2", "--json", "--no-progress", "--trace-level", "token", "--trace-file", str(path)]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["stats"]["steps"] == 2 and summary["trace_file"] == str(path)

    def test_a_bad_variable_stops_run_before_the_model_loads(self, monkeypatch, capsys):
        monkeypatch.setenv("TRACEDOFFLOAD_METRICS_PORT", "nine")
        assert main(["run", "--model", "random", "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err
        assert "TRACEDOFFLOAD_METRICS_PORT" in err and "loading" not in err


class TestServeUsesIt:
    def test_serve_writes_no_trace_file_unless_asked_and_reads_the_environment(self, monkeypatch, tmp_path):
        """`serve` has no default trace file (it runs for days), but TRACEDOFFLOAD_TRACE_FILE
        still gives it one, as it does `run`."""
        from tracedoffload.cli import build_parser, telemetry_flags

        monkeypatch.delenv("TRACEDOFFLOAD_TRACE_FILE", raising=False)
        args = build_parser().parse_args(["serve"])
        assert telemetry_flags.check_arguments(args, default_trace_file=False).trace_file is None
        monkeypatch.setenv("TRACEDOFFLOAD_TRACE_FILE", str(tmp_path / "serve.jsonl"))
        args = build_parser().parse_args(["serve"])
        assert telemetry_flags.check_arguments(args, default_trace_file=False).trace_file == tmp_path / "serve.jsonl"
