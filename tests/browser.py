"""Headless Chromium (Debian's `chromium`, installed by the tests when missing) driven over the
Chrome DevTools Protocol: open a page, note every request it makes and every error it logs, read
what its charts drew, take a screenshot."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import itertools
import json
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import websocket

from tests.debian_packages import apt_install, binary

PACKAGE = "chromium"
_BINARIES = ("chromium", "chromium-browser")
VIEWPORT = {"width": 1280, "height": 900}

# Per Plotly chart of the page: its traces and what of them is drawn in the DOM. Scatter lines and
# markers, bars, and heatmaps (an <image> per heatmap) each leave their own elements.
CHART_PROBE = """
Array.from(document.querySelectorAll('.plotly-graph-div')).map(div => ({
  id: div.id,
  main_svgs: div.querySelectorAll('.main-svg').length,
  traces: (div._fullData || []).length,
  drawn: div.querySelectorAll(
    '.scatterlayer .trace path.js-line, .scatterlayer .trace path.point, .barlayer .trace path, .heatmaplayer .hm image'
  ).length,
  width: div.getBoundingClientRect().width,
  height: div.getBoundingClientRect().height,
}))
"""


def ensure_chromium() -> str:
    """The Chromium binary, installed from Debian's archive the first time it is missing."""
    path = binary(*_BINARIES)
    if path is None:
        apt_install(PACKAGE)
        path = binary(*_BINARIES)
    if path is None:
        raise RuntimeError(f"apt-get installed {PACKAGE}, yet none of {_BINARIES} is on PATH")
    return path


@dataclasses.dataclass
class PageVisit:
    """What one page load showed."""

    url: str
    seconds_to_charts: float  # from the navigation to every chart drawn
    charts: list[dict[str, Any]]
    requests: list[str]  # every URL the page asked for, the page's own included
    errors: list[str]  # console errors, uncaught exceptions, and the browser's own error log entries
    screenshot_png: bytes
    text: str  # the page's visible text


class DevTools:
    """One DevTools websocket to one page target: commands in order, events kept as they come."""

    def __init__(self, url: str, timeout_s: float) -> None:
        # No Origin header: Chromium refuses websocket origins it was not told to allow.
        self._socket = websocket.create_connection(url, timeout=timeout_s, suppress_origin=True)
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command, wait for its answer; raises RuntimeError when it answers an error."""
        number = next(self._ids)
        self._socket.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv())
            if message.get("id") == number:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Read events until `done()` holds."""
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s} s for {what}")
            self._socket.settimeout(max(0.05, deadline - time.monotonic()))
            with contextlib.suppress(websocket.WebSocketTimeoutException):
                message = json.loads(self._socket.recv())
                if "method" in message:
                    self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        self._socket.close()


@contextlib.contextmanager
def chromium(profile_dir: Path, timeout_s: float = 60.0) -> Iterator[DevTools]:
    """A headless Chromium with a fresh profile, and a DevTools connection to its one page; the
    browser is stopped (by its process id) on the way out."""
    command = [
        ensure_chromium(),
        "--headless",
        "--no-sandbox",  # the tests run as root (CI installs packages), where the sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",  # a container's /dev/shm is small
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",  # the browser's own update and sync calls: not the page's
        "--disable-component-update",
        "--hide-scrollbars",
        f"--user-data-dir={profile_dir}",
        "--remote-debugging-port=0",  # any free port; the browser writes it to DevToolsActivePort
        "about:blank",
    ]
    log_path = profile_dir.parent / f"{profile_dir.name}-chromium.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    devtools = None
    try:
        port = _devtools_port(profile_dir / "DevToolsActivePort", process, log_path, timeout_s)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout_s) as answer:
            pages = [target for target in json.loads(answer.read()) if target.get("type") == "page"]
        devtools = DevTools(pages[0]["webSocketDebuggerUrl"], timeout_s)
        yield devtools
    finally:
        if devtools is not None:
            devtools.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def visit(devtools: DevTools, path: Path, expected_charts: int, timeout_s: float = 60.0) -> PageVisit:
    """Open the file at `path`, wait until `expected_charts` charts have drawn, and read back what
    happened: requests, errors, the charts' drawn elements, a full-page screenshot."""
    for domain in ("Network", "Runtime", "Log", "Page"):
        devtools.call(f"{domain}.enable")
    devtools.call("Emulation.setDeviceMetricsOverride", width=VIEWPORT["width"], height=VIEWPORT["height"], deviceScaleFactor=1, mobile=False)
    devtools.events.clear()
    url = path.resolve().as_uri()
    started = time.monotonic()
    devtools.call("Page.navigate", url=url)
    devtools.wait_for(lambda: any(e["method"] == "Page.loadEventFired" for e in devtools.events), timeout_s, "the page's load event")
    deadline = started + timeout_s
    while True:
        charts = devtools.evaluate(CHART_PROBE)
        if len(charts) >= expected_charts and all(chart["main_svgs"] and chart["drawn"] for chart in charts):
            break
        if time.monotonic() > deadline:
            break  # the caller's assertions say what is missing
        time.sleep(0.05)
    seconds = time.monotonic() - started
    size = devtools.call("Page.getLayoutMetrics")["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    screenshot = devtools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
    return PageVisit(
        url=url,
        seconds_to_charts=seconds,
        charts=charts,
        requests=[e["params"]["request"]["url"] for e in devtools.events if e["method"] == "Network.requestWillBeSent"],
        errors=_errors(devtools.events),
        screenshot_png=base64.b64decode(screenshot["data"]),
        text=devtools.evaluate("document.body.innerText"),
    )


def _errors(events: list[dict[str, Any]]) -> list[str]:
    errors = []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console." + params["type"] + ": " + " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(f"log: {params['entry'].get('text')} ({params['entry'].get('url', '')})")
    return errors


def _devtools_port(active_port_file: Path, process: subprocess.Popen, log_path: Path, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        if active_port_file.is_file():
            first_line = active_port_file.read_text().splitlines()[:1]
            if first_line and first_line[0].isdigit():
                return int(first_line[0])
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with status {process.returncode}: {log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"chromium wrote no DevToolsActivePort within {timeout_s} s: {log_path.read_text()[-3000:]}")
        time.sleep(0.05)
