"""compose/docker-compose.yml hangs together: the build machines have no Docker engine, so this
reads the files the stack would start with and checks what each service expects of the others
(names, ports, mounted files, the dashboards Grafana provisions)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).parent.parent
COMPOSE_DIR = ROOT / "compose"
COMPOSE = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PROMETHEUS = yaml.safe_load((ROOT / "collectors" / "prometheus" / "prometheus.yml").read_text())


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def mounts(service: str) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts (named volumes left out)."""
    binds = (v.split(":") for v in SERVICES[service].get("volumes", []))
    return {container: (COMPOSE_DIR / host).resolve() for host, container, *_ in binds if host.startswith(".")}


class TestCompose:
    def test_the_server_runs_beside_the_telemetry_stack(self):
        assert set(SERVICES) == {"serve", "otel-collector", "tempo", "jaeger", "prometheus", "alertmanager", "grafana"}

    def test_server_binds_every_address_with_a_required_api_key(self):
        """`serve` listens beyond loopback, so the key is required from the environment (compose
        stops with the message when it is unset), never a literal, never --allow-unauthenticated."""
        serve = SERVICES["serve"]
        command = serve["command"]
        assert command[:2] == ["tracedoffload", "serve"]
        assert flag(command, "--host") == "0.0.0.0" and flag(command, "--port") == "8000"
        assert "--allow-unauthenticated" not in command and "--api-key" not in command
        assert re.fullmatch(r"\$\{TRACEDOFFLOAD_API_KEY:\?.+\}", serve["environment"]["TRACEDOFFLOAD_API_KEY"])
        assert "8000:8000" in serve["ports"]

    def test_server_sends_traces_to_the_collector(self):
        endpoint = SERVICES["serve"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert endpoint == "http://otel-collector:4317"
        assert "4317:4317" in SERVICES["otel-collector"]["ports"]
        assert SERVICES["serve"]["environment"]["OTEL_METRICS_EXPORTER"] == "none"  # scraped instead, not twice

    def test_server_image_builds_from_files_that_exist(self):
        build = SERVICES["serve"]["build"]
        context = (COMPOSE_DIR / build["context"]).resolve()
        dockerfile = context / build["dockerfile"]
        assert context == ROOT and dockerfile.is_file()
        for source in re.findall(r"^COPY (.+) \S+$", dockerfile.read_text(), re.M):
            for path in source.split():
                assert (context / path).exists(), path

    def test_prometheus_scrapes_the_server_and_sends_to_alertmanager(self):
        """The serve job's target is the compose service on the port it listens on; the
        Alertmanager target is the alertmanager service."""
        targets = {c["job_name"]: c["static_configs"][0]["targets"] for c in PROMETHEUS["scrape_configs"]}
        assert targets["tracedoffload-serve"] == [f"serve:{flag(SERVICES['serve']['command'], '--port')}"]
        assert PROMETHEUS["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
        assert "9093:9093" in SERVICES["alertmanager"]["ports"]
        assert "--enable-feature=exemplar-storage" in SERVICES["prometheus"]["command"]

    def test_every_mounted_file_exists(self):
        for service in SERVICES:
            for container, host in mounts(service).items():
                assert host.exists(), f"{service}: {host} (mounted at {container})"

    def test_grafana_provisions_every_built_dashboard(self):
        """The dashboard provider reads the directory dashboards/ is mounted at, which holds the
        three built dashboards; the exemplar link and the data sources agree on Tempo's uid."""
        provisioning = mounts("grafana")["/etc/grafana/provisioning"]
        provider = yaml.safe_load((provisioning / "dashboards" / "dashboards.yaml").read_text())["providers"][0]
        dashboards = mounts("grafana")[provider["options"]["path"]]
        assert dashboards == ROOT / "dashboards"
        assert {"tracedoffload.json", "tracedoffload-serve.json", "tracedoffload-generation.json"} <= {p.name for p in dashboards.glob("*.json")}
        sources = yaml.safe_load((provisioning / "datasources" / "datasources.yaml").read_text())["datasources"]
        uids = {s["type"]: s["uid"] for s in sources}
        prometheus = next(s for s in sources if s["type"] == "prometheus")
        assert prometheus["jsonData"]["exemplarTraceIdDestinations"][0]["datasourceUid"] == uids["tempo"]

    def test_host_ports_are_distinct(self):
        published = [p.split(":")[0] for s in SERVICES.values() for p in s.get("ports", [])]
        assert len(published) == len(set(published))

    def test_api_key_variable_is_documented(self):
        readme = (ROOT / "README.md").read_text()
        assert "TRACEDOFFLOAD_API_KEY=" in readme and "docker compose" in readme
