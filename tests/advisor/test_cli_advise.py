"""`tracedoffload advise FILE` end to end on a real run's trace, and every bad input."""

from __future__ import annotations

import json

import pytest

from tracedoffload.cli import main
from tracedoffload.cli.advise import parse_device_memory

from .conftest import rewrite_spans

ROW_KEYS = {"gpu_layers", "residency", "prefetch", "sequences", "ms_per_token", "step_ms", "time_ms", "peak_device_bytes", "memory_bytes", "fits", "run_flags"}


def advise_json(capsys, path, *flags) -> dict:
    assert main(["advise", str(path), "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def error_line(capsys, *argv) -> str:
    assert main(["advise", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


class TestAdvice:
    def test_the_table_and_the_recommendation(self, capsys, tiny_trace):
        assert main(["advise", str(tiny_trace)]) == 0
        out = capsys.readouterr().out
        assert "resident  residency  prefetch  seqs  ms/token  step ms  peak MiB  note" in out
        assert "the run's own" in out and "recommended" in out
        assert "recommended: " in out and "  why: " in out and "  how: on cpu copies do not overlap compute" in out
        assert "  flags: --num-gpu-layers " in out

    def test_json_shape(self, capsys, tiny_trace):
        data = advise_json(capsys, tiny_trace)
        assert {"file", "device", "layers", "copy_engine", "measured", "figures", "candidates", "candidates_weighed", "excluded", "recommendation", "caveats"} <= set(data)
        assert (data["device"], data["layers"], data["copy_engine"], data["excluded"]) == ("cpu", 4, False, 0)
        for row in data["candidates"]:
            assert ROW_KEYS <= set(row)
            assert row["peak_device_bytes"] == sum(row["memory_bytes"].values())
        assert {"reason", "mechanism", "meets_target"} <= set(data["recommendation"])
        assert data["figures"]["batch_sizes"] == [1]
        assert len(data["figures"]["compute_ms_per_layer"]) == 4

    def test_the_runs_own_configuration_is_reproduced_exactly(self, capsys, tiny_trace):
        """On a CPU every figure is a mean over the same typical steps, so the model gives back the
        measured time of the run's own configuration (whatever the host's speed)."""
        measured = advise_json(capsys, tiny_trace)["measured"]
        assert (measured["gpu_layers"], measured["residency"], measured["prefetch"]) == (2, "interleaved", 1)
        assert measured["ms_per_token"] == pytest.approx(measured["measured_ms_per_token"], rel=1e-3)

    def test_without_a_budget_the_run_own_memory_bounds_the_choice(self, capsys, tiny_trace):
        data = advise_json(capsys, tiny_trace)
        assert data["recommendation"]["peak_device_bytes"] <= data["measured"]["peak_device_bytes"]
        assert data["recommendation"]["ms_per_token"] <= data["measured"]["ms_per_token"]

    def test_more_resident_layers_need_more_memory(self, capsys, tiny_trace):
        rows = advise_json(capsys, tiny_trace)["candidates"]
        by_count = {row["gpu_layers"]: row for row in rows if row["prefetch"] == 0}
        assert by_count[0]["memory_bytes"]["resident_layers"] == 0
        assert by_count[3]["memory_bytes"]["resident_layers"] > by_count[1]["memory_bytes"]["resident_layers"] > 0


class TestDeviceMemory:
    def test_candidates_over_the_budget_are_excluded_and_said_so(self, capsys, tiny_trace):
        rows = advise_json(capsys, tiny_trace)["candidates"]
        budget = sorted(row["peak_device_bytes"] for row in rows)[1]  # the second smallest
        data = advise_json(capsys, tiny_trace, "--device-memory", str(budget))
        assert data["excluded"] > 0
        assert data["recommendation"]["peak_device_bytes"] <= budget
        own = {key: data["measured"][key] for key in ("gpu_layers", "residency", "prefetch", "sequences")}
        others = [row for row in data["candidates"] if {key: row[key] for key in own} != own]
        assert others and all(row["fits"] and row["peak_device_bytes"] <= budget for row in others)
        assert main(["advise", str(tiny_trace), "--device-memory", str(budget)]) == 0
        assert f"excluded: {data['excluded']} candidates need more than --device-memory" in capsys.readouterr().out

    def test_nothing_fits_a_budget_below_the_smallest(self, capsys, tiny_trace):
        data = advise_json(capsys, tiny_trace, "--device-memory", "1KiB")
        assert data["recommendation"] is None
        assert main(["advise", str(tiny_trace), "--device-memory", "1KiB"]) == 0
        assert "no recommendation: none of the" in capsys.readouterr().out


class TestTarget:
    def test_a_target_everything_meets_takes_the_least_memory(self, capsys, tiny_trace):
        data = advise_json(capsys, tiny_trace, "--target-ms-per-token", "1e9")
        recommendation = data["recommendation"]
        assert recommendation["meets_target"] is True
        assert recommendation["gpu_layers"] == 0 and recommendation["prefetch"] == 0
        assert "the least device memory that meets" in recommendation["reason"]

    def test_a_target_nothing_meets_names_the_closest(self, capsys, tiny_trace):
        data = advise_json(capsys, tiny_trace, "--target-ms-per-token", "0.000001")
        recommendation = data["recommendation"]
        assert recommendation["meets_target"] is False
        assert recommendation["ms_per_token"] == min(row["ms_per_token"] for row in data["candidates"])
        assert "none meets 1e-06 ms/token; the closest" in recommendation["reason"]


class TestBadInput:
    def test_missing_file(self, capsys, tmp_path):
        assert "nope.jsonl': no such file" in error_line(capsys, str(tmp_path / "nope.jsonl"))

    def test_directory(self, capsys, tmp_path):
        assert "is a directory" in error_line(capsys, str(tmp_path))

    def test_not_a_trace_file(self, capsys, tmp_path):
        path = tmp_path / "junk.jsonl"
        path.write_text("this is not json\n")
        assert "is not an OTLP JSON-lines trace file" in error_line(capsys, str(path))

    @pytest.mark.parametrize("content", ["", '{"resourceSpans": []}\n'])
    def test_a_trace_with_no_steps(self, capsys, tmp_path, content):
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        assert "holds no step spans" in error_line(capsys, str(path))

    def test_a_trace_without_per_layer_figures(self, capsys, tmp_path, tiny_trace):
        path = tmp_path / "bare.jsonl"
        rewrite_spans(tiny_trace, path, lambda span: span.update(attributes=[a for a in span["attributes"] if not a["key"].startswith("step.layers.")]))
        assert "no per-layer figures step.layers.compute_ns" in error_line(capsys, str(path))

    def test_a_trace_without_the_models_sizes(self, capsys, tmp_path, tiny_trace):
        path = tmp_path / "old.jsonl"
        rewrite_spans(tiny_trace, path, lambda span: span.update(attributes=[a for a in span["attributes"] if not a["key"].startswith("tracedoffload.model.")]))
        assert "tracedoffload.model.layer_bytes" in error_line(capsys, str(path))

    @pytest.mark.parametrize("value", ["lots", "8 GiBs", "-1", "0", "1.5XB"])
    def test_device_memory_unparsable(self, capsys, tiny_trace, value):
        line = error_line(capsys, str(tiny_trace), "--device-memory", value)
        assert "device_memory=" in line and "512MiB" in line and "8GiB" in line and "8000000000" in line

    @pytest.mark.parametrize("value", ["0", "-3", "nan", "inf"])
    def test_target_not_a_positive_number(self, capsys, tiny_trace, value):
        assert "target_ms_per_token=" in error_line(capsys, str(tiny_trace), "--target-ms-per-token", value)

    def test_bad_flags_are_checked_before_the_file(self, capsys, tmp_path):
        """A bad flag is named even when the file is missing too."""
        assert "device_memory=" in error_line(capsys, str(tmp_path / "nope.jsonl"), "--device-memory", "lots")


class TestDeviceMemoryForms:
    @pytest.mark.parametrize(
        ("text", "size"),
        [("8GiB", 8 << 30), ("512MiB", 512 << 20), ("8000000000", 8_000_000_000), ("1.5GiB", 3 << 29), ("8GB", 8_000_000_000), ("64 kib", 64 << 10), ("100B", 100)],
    )
    def test_accepted(self, text, size):
        assert parse_device_memory(text) == size


def test_advise_is_listed_in_the_commands(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    assert "advise" in capsys.readouterr().out
