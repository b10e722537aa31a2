"""The Grafana dashboard is the one dashboards/build.py makes, and queries only known metrics."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from tracedoffload import names

ROOT = Path(__file__).parent.parent


def load_builder():
    spec = importlib.util.spec_from_file_location("dashboard_build", ROOT / "dashboards" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestDashboard:
    def test_committed_json_is_what_the_builder_makes(self):
        """dashboards/tracedoffload.json equals build.py's output (rebuild it after changing metrics)."""
        assert (ROOT / "dashboards" / "tracedoffload.json").read_text() == load_builder().render()

    def test_every_query_uses_known_metric_names(self):
        """Each Prometheus expression names only metrics from tracedoffload/names.py (with histogram suffixes)."""
        known = {m.prometheus for m in names.ALL}
        dashboard = json.loads((ROOT / "dashboards" / "tracedoffload.json").read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"] if "expr" in t]
        assert exprs
        for expr in exprs:
            for name in re.findall(r"\b((?:tracedoffload|gen_ai|hw|process)_[a-z0-9_]+)", expr):
                assert name.removesuffix("_bucket") in known, f"{name} in {expr}"
