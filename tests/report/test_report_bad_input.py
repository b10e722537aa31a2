"""Bad input to `report --html` and `run --html`: one line naming the field, exit status 2,
nothing written (not even half a page), and for `run` nothing loaded first."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.report.conftest import TracedRun
from tracedoffload._exceptions import ConfigError
from tracedoffload.cli import main
from tracedoffload.report import output

pytestmark = pytest.mark.usefixtures("in_tmp_dir")

MODEL_LOADED = "offload.attached"  # the first log line after the model is loaded and offloaded


def refused(capsys, argv: list[str]) -> str:
    """Run `argv` expecting exit 2 with one error line and no traceback; return the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and MODEL_LOADED not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def assert_nothing_written(directory) -> None:
    assert sorted(path.name for path in directory.iterdir() if path.suffix in (".html", ".tmp")) == []


class TestReportHtmlBadInput:
    def test_missing_trace_file(self, capsys, tmp_path):
        line = refused(capsys, ["report", str(tmp_path / "nope.jsonl"), "--html", str(tmp_path / "out.html")])
        assert "file=" in line and "nope.jsonl" in line and "no such file" in line
        assert_nothing_written(tmp_path)

    def test_trace_file_that_is_a_directory(self, capsys, tmp_path):
        line = refused(capsys, ["report", str(tmp_path), "--html", str(tmp_path / "out.html")])
        assert "file=" in line and "is a directory" in line
        assert_nothing_written(tmp_path)

    def test_a_file_that_is_not_a_trace(self, capsys, tmp_path):
        junk = tmp_path / "notes.txt"
        junk.write_text("this is not json\n")
        line = refused(capsys, ["report", str(junk), "--html", str(tmp_path / "out.html")])
        assert "file=" in line and "not an OTLP JSON-lines trace file" in line
        assert_nothing_written(tmp_path)

    def test_a_binary_file(self, capsys, tmp_path):
        binary = tmp_path / "image.png"
        binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 64)
        assert "not an OTLP JSON-lines trace file" in refused(capsys, ["report", str(binary), "--html", str(tmp_path / "out.html")])
        assert_nothing_written(tmp_path)

    @pytest.mark.parametrize("content", ["", '{"resourceSpans": []}\n'])
    def test_a_trace_without_step_spans(self, capsys, tmp_path, content):
        trace = tmp_path / "empty.otlp.jsonl"
        trace.write_text(content)
        line = refused(capsys, ["report", str(trace), "--html", str(tmp_path / "out.html")])
        assert "holds no step spans" in line and "--trace-level token or layer" in line
        assert_nothing_written(tmp_path)

    def test_out_in_a_missing_directory(self, capsys, tmp_path, layer_run: TracedRun):
        line = refused(capsys, ["report", str(layer_run.trace), "--html", str(tmp_path / "missing" / "out.html")])
        assert "html=" in line and "does not exist" in line
        assert not (tmp_path / "missing").exists()  # not created either

    def test_out_that_is_a_directory(self, capsys, tmp_path, layer_run: TracedRun):
        line = refused(capsys, ["report", str(layer_run.trace), "--html", str(tmp_path)])
        assert "html=" in line and "this is a directory" in line

    def test_plotly_missing_names_the_extra(self, capsys, tmp_path, monkeypatch, layer_run: TracedRun):
        monkeypatch.setitem(sys.modules, "plotly", None)  # what `import plotly` finds when it is not installed
        line = refused(capsys, ["report", str(layer_run.trace), "--html", str(tmp_path / "out.html")])
        assert "plotly" in line and "pip install 'tracedoffload[report]'" in line
        assert_nothing_written(tmp_path)


class TestRunHtmlBadInput:
    """Refused before the model loads (`refused` checks that no offloader attached)."""

    def run_refused(self, capsys, *flags: str) -> str:
        return refused(capsys, ["run", "--model", "random", "--max-new-tokens", "2", "--no-progress", *flags])

    def test_out_in_a_missing_directory(self, capsys, tmp_path):
        line = self.run_refused(capsys, "--html", str(tmp_path / "missing" / "out.html"))
        assert "html=" in line and "does not exist" in line

    def test_a_trace_level_without_step_spans(self, capsys, tmp_path):
        line = self.run_refused(capsys, "--trace-level", "generation", "--html", str(tmp_path / "out.html"))
        assert "html=" in line and "--trace-level token or layer" in line

    def test_no_offload(self, capsys, tmp_path):
        line = self.run_refused(capsys, "--no-offload", "--html", str(tmp_path / "out.html"))
        assert "html=" in line and "--no-offload nothing is traced" in line

    def test_plotly_missing_names_the_extra(self, capsys, tmp_path, monkeypatch):
        monkeypatch.setitem(sys.modules, "plotly", None)
        line = self.run_refused(capsys, "--no-trace-file", "--html", str(tmp_path / "out.html"))
        assert "pip install 'tracedoffload[report]'" in line


class TestAtomicWrite:
    def test_a_failed_write_leaves_the_previous_page_and_no_temporary_file(self, tmp_path, monkeypatch):
        page = tmp_path / "report.html"
        page.write_text("the previous report")

        def failing_replace(source, target):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(output.os, "replace", failing_replace)
        with pytest.raises(ConfigError, match=r"html=.*No space left on device"):
            output.write_atomically(page, "<html>new</html>")
        assert page.read_text() == "the previous report"
        assert sorted(path.name for path in tmp_path.iterdir()) == ["report.html"]

    def test_a_write_replaces_the_page_whole(self, tmp_path):
        page = tmp_path / "report.html"
        page.write_text("x" * 10_000)
        assert output.write_atomically(page, "<html>é</html>") == len("<html>é</html>".encode())
        assert page.read_text(encoding="utf-8") == "<html>é</html>"
        assert sorted(path.name for path in tmp_path.iterdir()) == ["report.html"]


HEAVY = ("plotly", "torch", "opentelemetry.sdk")


@pytest.mark.parametrize(
    "argv",
    [["report", "--help"], ["run", "--help"], ["report", "/no/such/file.jsonl", "--html", "out.html"], ["report", "x.jsonl", "--html", "/no/such/dir/out.html"]],
    ids=" ".join,
)
def test_help_and_bad_paths_import_no_plotly(argv):
    """plotly is imported only to draw a page: help and refused paths answer without it."""
    script = (
        "import sys\nfrom tracedoffload.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120, check=False)
    assert "HEAVY=\n" in done.stderr or done.stderr.rstrip().endswith("HEAVY="), done.stderr[-2000:]
