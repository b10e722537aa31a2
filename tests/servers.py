"""Real Prometheus and Alertmanager for the tests: installed from Debian's packages when missing,
started on free loopback ports with the project's own rules and routes, stopped by process id."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import yaml

from tests.debian_packages import apt_install, binary

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "collectors" / "prometheus" / "alerts.yml"
ALERTMANAGER_CONFIG = ROOT / "collectors" / "alertmanager" / "alertmanager.yml"
PACKAGES = ("prometheus", "prometheus-alertmanager")
_installed = False


def ensure_debian_packages() -> None:
    """Install Debian's prometheus and prometheus-alertmanager once, when a binary is missing."""
    global _installed
    if _installed or all(binary(n) for n in ("promtool", "prometheus")) and binary("prometheus-alertmanager", "alertmanager"):
        _installed = True
        return
    apt_install(*PACKAGES)
    _installed = True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_serve(flags: Sequence[str], log_file: Path, env: Mapping[str, str] | None = None, ready_timeout_s: float = 120) -> tuple[subprocess.Popen, str]:
    """`tracedoffload serve` with `flags` on a free loopback port, once /ready answers 200: the
    process and its base URL. Its stderr goes to `log_file` (a pipe nobody reads would fill and
    block a long run); `env`: its whole environment (default: this process's)."""
    port = free_port()
    command = [sys.executable, "-m", "tracedoffload", "serve", "--port", str(port), *flags]
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=dict(env) if env is not None else None)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while True:
        assert process.poll() is None, log_file.read_text()[-3000:]
        try:
            with urllib.request.urlopen(base + "/ready", timeout=2) as response:
                if response.status == 200:
                    return process, base
        except OSError:  # not listening yet, or 503 while the engine starts
            pass
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.2)


def get_json(url: str, timeout: float = 5.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class _WebhookSink(http.server.BaseHTTPRequestHandler):
    """Records Alertmanager's webhook POSTs (the receivers of the test configuration)."""

    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length", 0))
        self.received.append({"path": self.path, "body": json.loads(self.rfile.read(length) or b"{}")})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@dataclasses.dataclass
class Stack:
    prometheus_url: str
    alertmanager_url: str
    webhook: list[dict]
    processes: list[subprocess.Popen]

    def query(self, expr: str) -> list[dict]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        return get_json(url)["data"]["result"]

    def prometheus_alerts(self) -> list[dict]:
        return get_json(f"{self.prometheus_url}/api/v1/alerts")["data"]["alerts"]

    def alertmanager_alerts(self) -> list[dict]:
        return get_json(f"{self.alertmanager_url}/api/v2/alerts")

    def wait_for(self, predicate, timeout: float, interval: float = 0.5):
        """Poll `predicate()` until it returns something truthy; that value, or None on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        return None


def _wait_ready(url: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}: {process.stderr.read()[-2000:] if process.stderr else ''}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def write_test_configs(work: Path, targets: list[str], alertmanager_port: int, webhook_port: int) -> tuple[Path, Path]:
    """The project's rules and routes with test timings (1 s scrapes, evaluations and waits) and the
    receivers pointed at the local webhook sink."""
    prometheus_config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]}]},
        "scrape_configs": [{"job_name": "tracedoffload", "static_configs": [{"targets": targets}]}],
    }
    routes = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    for route in [routes["route"], *routes["route"].get("routes", [])]:
        route.update({"group_wait": "1s", "group_interval": "1s"})
    for receiver in routes["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"http://127.0.0.1:{webhook_port}/{receiver['name']}"
    prometheus_file, alertmanager_file = work / "prometheus.yml", work / "alertmanager.yml"
    prometheus_file.write_text(yaml.safe_dump(prometheus_config))
    alertmanager_file.write_text(yaml.safe_dump(routes))
    return prometheus_file, alertmanager_file


@contextlib.contextmanager
def prometheus_stack(work: Path, targets: list[str]) -> Iterator[Stack]:
    """Prometheus scraping `targets`, Alertmanager, and a webhook sink, all on loopback."""
    ensure_debian_packages()
    _WebhookSink.received = []
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _WebhookSink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    prometheus_port, alertmanager_port = free_port(), free_port()
    prometheus_file, alertmanager_file = write_test_configs(work, targets, alertmanager_port, sink.server_port)
    processes: list[subprocess.Popen] = []
    try:
        alertmanager = subprocess.Popen(
            [binary("prometheus-alertmanager", "alertmanager"), f"--config.file={alertmanager_file}", f"--storage.path={work / 'am'}",
             f"--web.listen-address=127.0.0.1:{alertmanager_port}", "--cluster.listen-address="],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        processes.append(alertmanager)
        prometheus = subprocess.Popen(
            [binary("prometheus"), f"--config.file={prometheus_file}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}", "--enable-feature=exemplar-storage"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        processes.append(prometheus)
        _wait_ready(f"http://127.0.0.1:{alertmanager_port}/-/ready", alertmanager)
        _wait_ready(f"http://127.0.0.1:{prometheus_port}/-/ready", prometheus)
        yield Stack(f"http://127.0.0.1:{prometheus_port}", f"http://127.0.0.1:{alertmanager_port}", _WebhookSink.received, processes)
    finally:
        for process in processes:
            _stop(process)
        sink.shutdown()
        sink.server_close()
