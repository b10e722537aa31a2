"""The Grafana dashboards are the ones dashboards/build.py makes, and query only known metrics and
span names."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tracedoffload import names
from tests.servers import binary, ensure_debian_packages

ROOT = Path(__file__).parent.parent
DASHBOARDS = ("tracedoffload.json", "tracedoffload-serve.json", "tracedoffload-generation.json")
PROMETHEUS_DASHBOARDS = ("tracedoffload.json", "tracedoffload-serve.json")


def load_builder():
    spec = importlib.util.spec_from_file_location("dashboard_build", ROOT / "dashboards" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name: str) -> dict:
    return json.loads((ROOT / "dashboards" / name).read_text())


def prometheus_exprs(name: str) -> list[str]:
    return [t["expr"] for p in load(name)["panels"] for t in p["targets"] if "expr" in t]


class TestDashboard:
    @pytest.mark.parametrize("name", DASHBOARDS)
    def test_committed_json_is_what_the_builder_makes(self, name):
        """Each dashboards/*.json equals build.py's output (rebuild them after changing metrics)."""
        assert (ROOT / "dashboards" / name).read_text() == load_builder().render(name)

    def test_every_dashboard_file_is_built(self):
        """No dashboard JSON in dashboards/ that build.py does not make (Grafana provisions them all)."""
        assert sorted(p.name for p in (ROOT / "dashboards").glob("*.json")) == sorted(DASHBOARDS)
        assert len({load(name)["uid"] for name in DASHBOARDS}) == len(DASHBOARDS)

    @pytest.mark.parametrize("name", PROMETHEUS_DASHBOARDS)
    def test_every_query_uses_known_metric_names(self, name):
        """Each Prometheus expression names only metrics from tracedoffload/names.py (with histogram suffixes)."""
        known = {m.prometheus for m in names.ALL}
        exprs = prometheus_exprs(name)
        assert exprs
        for expr in exprs:
            for metric in re.findall(r"\b((?:tracedoffload|gen_ai|hw|process)_[a-z0-9_]+)", expr):
                assert metric.removesuffix("_bucket") in known, f"{metric} in {expr}"

    def test_serve_dashboard_shows_every_server_metric(self):
        """The server dashboard has a panel on each of the server's own metrics."""
        text = " ".join(prometheus_exprs("tracedoffload-serve.json"))
        server = [names.SERVER_QUEUE_DURATION, names.SERVER_REQUESTS, names.SERVER_REQUESTS_WAITING, names.SERVER_REQUESTS_RUNNING,
                  names.SERVER_ENGINE_UP, names.KV_CACHE_USAGE, names.KV_CACHE_LIMIT, names.STEP_BATCH_SIZE, names.STEP_BATCH_TOKENS]
        assert [m.prometheus for m in server if m.prometheus not in text] == []

    def test_serve_dashboard_scrape_job_is_the_configured_one(self):
        """The `up` panel names the serve job that collectors/prometheus/prometheus.yml scrapes."""
        jobs = {c["job_name"] for c in yaml.safe_load((ROOT / "collectors" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]}
        assert load_builder().SERVE_JOB in jobs

    def test_traceql_queries_use_known_span_and_attribute_names(self):
        """The drill-down's TraceQL names only spans and attributes from tracedoffload/names.py."""
        known = {v for k, v in vars(names).items() if k.isupper() and isinstance(v, str)}
        queries = [t["query"] for p in load("tracedoffload-generation.json")["panels"] for t in p["targets"]]
        assert len(queries) == 3
        for query in queries:
            attributes = re.findall(r"\bspan\.([a-z_.]+)", query)
            span_names = re.findall(r'\bname =~? "([a-z_.]+)', query)
            assert attributes and span_names
            assert set(attributes) | set(span_names) <= known, query

    @pytest.mark.servers
    @pytest.mark.parametrize("name", PROMETHEUS_DASHBOARDS)
    def test_prometheus_expressions_parse(self, name, tmp_path):
        """promtool parses every expression (Grafana's variables given sample values) as a recording rule."""
        ensure_debian_packages()
        substitute = {"$__rate_interval": "5m", "$model": ".*", "$instance": ".*"}
        rules = []
        for i, expr in enumerate(prometheus_exprs(name)):
            for variable, value in substitute.items():
                expr = expr.replace(variable, value)
            rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
        path = tmp_path / "rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        result = subprocess.run([binary("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
