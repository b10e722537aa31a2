"""Alert rules with promtool, and end to end: a real `tracedoffload run` with an injected leak
pages through real Prometheus and Alertmanager, and a normal run fires nothing."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from tracedoffload import names
from tests.servers import ALERTMANAGER_CONFIG, RULES, binary, ensure_debian_packages, free_port, prometheus_stack, write_test_configs

pytestmark = pytest.mark.servers
RULES_TEST = RULES.with_name("alerts_test.yml")
PROMETHEUS_CONFIG = RULES.with_name("prometheus.yml")


@pytest.fixture(scope="module", autouse=True)
def debian_packages():
    ensure_debian_packages()


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=120)


def amtool(*args: str) -> subprocess.CompletedProcess:
    if not binary("amtool"):
        pytest.skip("amtool is not installed (Debian's prometheus-alertmanager ships it)")
    return subprocess.run([binary("amtool"), *args], capture_output=True, text=True, timeout=60)


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


class TestRules:
    def test_rules_file_is_valid(self):
        """promtool accepts collectors/prometheus/alerts.yml."""
        result = promtool("check", "rules", str(RULES))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_rule_unit_tests_pass(self):
        """The promtool unit tests fire each alert on its fault and nothing on normal behaviour."""
        result = promtool("test", "rules", str(RULES_TEST))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_generated_test_config_is_valid(self, tmp_path):
        """The configuration the end-to-end test runs Prometheus with passes promtool check config."""
        prometheus_file, _ = write_test_configs(tmp_path, ["127.0.0.1:9"], 9093, 5001)
        result = promtool("check", "config", str(prometheus_file))
        assert result.returncode == 0, result.stdout + result.stderr

    @pytest.mark.parametrize(
        "breakage, message",
        [
            (lambda rule: rule.update(expr="max by (source (tracedoffload_leak_suspected)"), "parse error"),
            (lambda rule: rule.pop("expr"), "expr"),
        ],
        ids=["bad-promql", "missing-expr"],
    )
    def test_a_broken_rules_file_is_rejected(self, tmp_path, breakage, message):
        """promtool rejects a rules file with a PromQL error or a rule without expr, naming the problem."""
        rules = yaml.safe_load(RULES.read_text())
        breakage(rules["groups"][0]["rules"][0])
        broken = tmp_path / "alerts.yml"
        broken.write_text(yaml.safe_dump(rules))
        result = promtool("check", "rules", str(broken))
        assert result.returncode != 0
        assert message in (result.stdout + result.stderr).lower()

    def test_every_alert_has_a_severity_and_a_runbook(self):
        """Each alert is a page or a ticket and says what, why and where to look, and the README's
        runbook table has a row for it."""
        readme = (RULES.parent.parent.parent / "README.md").read_text()
        for rule in alert_rules():
            assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
            assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
            assert rule["annotations"]["runbook"].startswith("README.md#alerts"), rule["alert"]
            assert f"| `{rule['alert']}` |" in readme, f"{rule['alert']} has no row in the README's runbook table"

    def test_production_prometheus_config_is_valid(self):
        """promtool accepts collectors/prometheus/prometheus.yml (the compose stack's), with its rules."""
        result = promtool("check", "config", str(PROMETHEUS_CONFIG))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_server_alerts_read_the_scraped_serve_job(self):
        """The job TracedOffloadServerUnreachable watches is one prometheus.yml scrapes."""
        jobs = {c["job_name"] for c in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
        unreachable = next(r for r in alert_rules() if r["alert"] == "TracedOffloadServerUnreachable")
        assert re.search(r'job="([^"]+)"', unreachable["expr"]).group(1) in jobs

    def test_alertmanager_config_is_valid(self):
        """amtool accepts collectors/alertmanager/alertmanager.yml."""
        result = amtool("check-config", str(ALERTMANAGER_CONFIG))
        assert result.returncode == 0, result.stdout + result.stderr

    @pytest.mark.parametrize("severity, receiver", [("page", "pager"), ("ticket", "tickets")])
    def test_alerts_route_by_severity(self, severity, receiver):
        """Each alert's severity reaches its receiver through the configured routes."""
        for rule in alert_rules():
            if rule["labels"]["severity"] != severity:
                continue
            labels = [f"alertname={rule['alert']}", f"severity={severity}", "instance=serve:8000", "model=m"]
            result = amtool("config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", f"--verify.receivers={receiver}", *labels)
            assert result.returncode == 0, f"{rule['alert']}: {result.stdout}{result.stderr}"

    def test_rules_use_only_known_metrics(self):
        """Every metric an alert reads is defined in tracedoffload/names.py."""
        known = {m.prometheus for m in names.ALL}
        text = RULES.read_text()
        used = set(re.findall(r"\b(tracedoffload_[a-z0-9_]+)", text))
        assert used
        assert {name.removesuffix("_bucket") for name in used} <= known


def run_cli(port: int, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "tracedoffload", "run", "--model", "random", "--metrics-port", str(port), "--no-trace-file", "--no-progress", "--max-new-tokens", "40", *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# Alerts on how fast tokens are: a loaded test host reaches their thresholds (pending or firing)
# with nothing wrong in the code, so a test about leaks must not count them as false alarms.
HOST_SPEED_ALERTS = {"TracedOffloadDecodeStepLatencyHigh", "TracedOffloadTTFTBudgetBurnFast", "TracedOffloadTTFTBudgetBurnSlow"}


def alerts_beyond_host_speed(alerts: list[dict], instance: str) -> list[dict]:
    """The alerts of `instance`, pending or firing, other than those on token speed."""
    return [a for a in alerts if a["labels"].get("instance") == instance and a["labels"].get("alertname") not in HOST_SPEED_ALERTS]


class TestEndToEnd:
    def test_injected_leak_pages_and_a_normal_run_fires_nothing(self, tmp_path):
        """A normal run is scraped and fires no memory or telemetry alert (token-speed alerts
        depend on the host's load and are left out); a run with --inject-leak host reaches
        Alertmanager and the pager webhook."""
        normal_port, leak_port = free_port(), free_port()
        normal_target, leak_target = f"127.0.0.1:{normal_port}", f"127.0.0.1:{leak_port}"
        with prometheus_stack(tmp_path, [normal_target, leak_target]) as stack:
            normal = run_cli(normal_port, "--metrics-linger", "8")
            try:
                scraped = stack.wait_for(lambda: stack.query(f'tracedoffload_generated_tokens_total{{instance="{normal_target}"}} > 0'), timeout=90)
                assert scraped, "the normal run's metrics were never scraped"
                stack.wait_for(lambda: None, timeout=4)  # several 1 s evaluation cycles on its data
                assert stack.query(f'tracedoffload_leak_suspected{{instance="{normal_target}"}} == 0')
                assert alerts_beyond_host_speed(stack.prometheus_alerts(), normal_target) == []
            finally:
                out, err = normal.communicate(timeout=120)
            assert normal.returncode == 0, err[-2000:]

            leak = run_cli(leak_port, "--inject-leak", "host", "--metrics-linger", "20")
            try:
                arrived = stack.wait_for(
                    lambda: [a for a in stack.alertmanager_alerts() if a["labels"]["alertname"] == "TracedOffloadLeakSuspected"],
                    timeout=90,
                )
                assert arrived, "TracedOffloadLeakSuspected never reached Alertmanager"
                alert = arrived[0]
                assert alert["labels"]["instance"] == leak_target and alert["labels"]["source"] == "host"
                assert alert["labels"]["severity"] == "page"
                paged = stack.wait_for(lambda: [w for w in stack.webhook if w["path"] == "/pager"], timeout=30)
                assert paged and paged[0]["body"]["alerts"][0]["labels"]["alertname"] == "TracedOffloadLeakSuspected"
            finally:
                out, err = leak.communicate(timeout=120)
            assert leak.returncode == 0, err[-2000:]
            assert "memory.leak_suspected" in err
            assert alerts_beyond_host_speed(stack.prometheus_alerts(), normal_target) == []
