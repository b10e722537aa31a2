"""`tracedoffload report FILE`: the statistics of a run recomputed from its trace file."""

from __future__ import annotations

import json
import re

import pytest

from tracedoffload.cli import main

# Each test in its own directory: the default traces/ of a run lands there, not in the checkout.
pytestmark = pytest.mark.usefixtures("in_tmp_dir")


def run_to_file(capsys, path, *flags):
    assert main(["run", "--model", "random", "--max-new-tokens", "6", "--json", "--no-progress", "--trace-file", str(path), *flags]) == 0
    return json.loads(capsys.readouterr().out)


LIVE_ONLY = ("dropped_spans", "dropped_steps", "telemetry_errors")  # counters a file cannot hold


def assert_report_equals_live(capsys, path, live: dict) -> None:
    """`report FILE --json` gives the statistics `run` printed, but for the live-only counters."""
    assert main(["report", str(path), "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    expected = {key: value for key, value in json.loads(json.dumps(live)).items() if key not in LIVE_ONLY}
    assert {key: value for key, value in from_file.items() if key not in LIVE_ONLY} == expected


class TestReport:
    def test_report_equals_the_live_statistics(self, capsys, tmp_path):
        """The file's statistics equal those `run` printed, except the live-only counters."""
        path = tmp_path / "run.otlp.jsonl"
        assert_report_equals_live(capsys, path, run_to_file(capsys, path, "--full-detail")["stats"])

    def test_report_lists_the_slowest_steps_with_trace_ids(self, capsys, tmp_path):
        """The text report shows the statistics table and the slowest steps' trace ids."""
        path = tmp_path / "run.otlp.jsonl"
        live = run_to_file(capsys, path)["stats"]
        assert main(["report", str(path), "--slowest", "3"]) == 0
        out = capsys.readouterr().out
        assert "offload statistics (from spans)" in out
        assert live["slowest_steps"][0]["trace_id"] in out
        assert re.search(r"dropped spans +not known from a trace file", out)

    def test_missing_file_exits_2(self, capsys, tmp_path):
        """A missing file is one error line naming it, exit status 2."""
        assert main(["report", str(tmp_path / "nope.jsonl")]) == 2
        assert "nope.jsonl" in capsys.readouterr().err

    def test_a_file_that_is_not_otlp_exits_2(self, capsys, tmp_path):
        """A file that is not OTLP JSON lines is refused with a clear message."""
        path = tmp_path / "junk.jsonl"
        path.write_text("this is not json\n")
        assert main(["report", str(path)]) == 2
        assert "not an OTLP JSON-lines trace file" in capsys.readouterr().err

    def test_a_directory_exits_2_saying_so(self, capsys, tmp_path):
        assert main(["report", str(tmp_path)]) == 2
        assert "is a directory" in capsys.readouterr().err

    @pytest.mark.parametrize("content", ["", "{}\n", '{"resourceSpans": []}\n'])
    def test_a_file_without_step_spans_exits_2(self, capsys, tmp_path, content):
        """An empty file, or one with no step spans, has no statistics to report: an error, not zeros."""
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        assert main(["report", str(path)]) == 2
        assert "holds no step spans" in capsys.readouterr().err

    def test_a_generation_level_trace_says_which_level_is_needed(self, capsys, tmp_path):
        path = tmp_path / "run.otlp.jsonl"
        run_to_file(capsys, path, "--trace-level", "generation")
        assert main(["report", str(path)]) == 2
        assert "--trace-level token or layer" in capsys.readouterr().err

    @pytest.mark.parametrize(
        "attribute",
        [
            {"key": "step.layers.compute_ns", "value": {"arrayValue": {"values": [{"stringValue": "x"}]}}},
            {"key": "step.layers.compute_ns", "value": {"intValue": "5"}},
            {"key": "step.compute_ns", "value": {"arrayValue": {"values": [{"intValue": "1"}]}}},
            {"key": "step.index", "value": {"arrayValue": {"values": []}}},
            {"key": "step.compute_ns", "value": {"doubleValue": "Infinity"}},
            {"key": "step.payload", "value": {"bytesValue": "not base64!"}},
            {"key": "step.index", "value": {"intValue": "five"}},
        ],
    )
    def test_step_spans_with_wrongly_typed_attributes_exit_2(self, capsys, tmp_path, attribute):
        """A step span whose figures have the wrong types is refused with one line, no traceback."""
        span = {
            "traceId": "0" * 31 + "1", "spanId": "0" * 15 + "2", "name": "step",
            "startTimeUnixNano": "1000", "endTimeUnixNano": "2000", "attributes": [attribute],
        }
        line = {"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"scope": {"name": "t"}, "spans": [span]}]}]}
        path = tmp_path / "typed.jsonl"
        path.write_text(json.dumps(line) + "\n")
        assert main(["report", str(path)]) == 2
        err = capsys.readouterr().err
        assert "not an OTLP JSON-lines trace file" in err
        assert attribute["key"] in err  # the message names the attribute
        assert "Incorrect padding" not in err and "Error(" not in err

    def test_a_malformed_trace_id_is_named(self, capsys, tmp_path):
        """An id that is neither hex nor base64 is named with the line, not a bare decoder error."""
        span = {"traceId": "zz", "spanId": "0" * 15 + "2", "name": "step", "startTimeUnixNano": "1", "endTimeUnixNano": "2"}
        line = {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}
        path = tmp_path / "ids.jsonl"
        path.write_text(json.dumps(line) + "\n")
        assert main(["report", str(path)]) == 2
        err = capsys.readouterr().err
        assert "ids.jsonl:1" in err and "traceId 'zz' is neither 32 hex digits nor base64" in err
        assert "Traceback" not in err

    def test_slowest_lists_as_many_as_asked_beyond_the_default_ten(self, capsys, tmp_path):
        path = tmp_path / "run.otlp.jsonl"
        assert main(["run", "--model", "random", "--max-new-tokens", "12", "--json", "--no-progress", "--trace-file", str(path)]) == 0
        capsys.readouterr()
        assert main(["report", str(path), "--slowest", "12"]) == 0
        assert len(re.findall(r"step +\d+ +(?:prefill|decode) +x1 +trace [0-9a-f]{32}", capsys.readouterr().out)) == 12
