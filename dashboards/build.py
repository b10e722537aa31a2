"""Builds dashboards/tracedoffload.json from tracedoffload.names (its metrics), so the dashboard cannot
drift from the metrics (tests/test_dashboard.py checks the committed file is what this builds).

    python dashboards/build.py      # rewrite dashboards/tracedoffload.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tracedoffload import names as mn

OUT = Path(__file__).with_name("tracedoffload.json")
SELECTOR = '{model=~"$model", instance=~"$instance"}'


def _target(expr: str, legend: str, ref: str, exemplar: bool = False) -> dict[str, Any]:
    return {"datasource": {"type": "prometheus", "uid": "${prometheus}"}, "expr": expr, "legendFormat": legend, "refId": ref, "exemplar": exemplar}


def _panel(title: str, targets: list[dict[str, Any]], unit: str, x: int, y: int, w: int = 12, h: int = 8, description: str = "") -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${prometheus}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": targets,
    }


def _quantile(metric: mn.MetricName, q: float, by: str = "") -> str:
    group = f"le{', ' + by if by else ''}"
    return f"histogram_quantile({q}, sum by ({group}) (rate({metric.prometheus}_bucket{SELECTOR}[$__rate_interval])))"


def build() -> dict[str, Any]:
    panels = [
        _panel("Step (forward) latency p50 / p95 by phase; exemplars open the step's trace", [
            _target(_quantile(mn.STEP_LATENCY, 0.5, "phase"), "p50 {{phase}}", "A", exemplar=True),
            _target(_quantile(mn.STEP_LATENCY, 0.95, "phase"), "p95 {{phase}}", "B", exemplar=True),
            _target(_quantile(mn.TIME_TO_FIRST_TOKEN, 0.95), "time to first token p95", "C", exemplar=True),
            _target(_quantile(mn.TIME_PER_OUTPUT_TOKEN, 0.95), "time per output token p95", "D", exemplar=True),
        ], "s", 0, 0),
        _panel("Layer transfer and compute p95", [
            _target(_quantile(mn.LAYER_TRANSFER, 0.95), "transfer p95", "A"),
            _target(_quantile(mn.LAYER_COMPUTE, 0.95), "compute p95", "B"),
        ], "s", 12, 0),
        _panel("Host-to-device bytes per second", [
            _target(f"sum(rate({mn.BYTES_COPIED.prometheus}{SELECTOR}[$__rate_interval]))", "copied", "A"),
        ], "Bps", 0, 8),
        _panel("Generated tokens and forwards per second (a batch makes more tokens per forward)", [
            _target(f"sum(rate({mn.GENERATED_TOKENS.prometheus}{SELECTOR}[$__rate_interval]))", "tokens/s", "A"),
            _target(f"sum(rate({mn.STEPS.prometheus}{SELECTOR}[$__rate_interval]))", "forwards/s", "B"),
        ], "short", 12, 8),
        _panel("Quiet-point memory by source (leaks show as a rising floor) and KV tokens held", [
            _target(f"{mn.QUIET_POINT.prometheus}{SELECTOR}", "{{source}}", "A"),
            _target(f"{mn.KV_TOKENS.prometheus}{SELECTOR} * {mn.KV_EXPECTED.prometheus}{SELECTOR}", "KV cache bytes expected", "B"),
        ], "bytes", 0, 16),
        _panel("Leak detector", [
            _target(f"{mn.LEAK_SUSPECTED.prometheus}{SELECTOR}", "suspected {{source}}", "A"),
            _target(f"{mn.LEAK_BYTES_PER_STEP.prometheus}{SELECTOR}", "bytes/step {{source}}", "B"),
        ], "short", 12, 16),
        _panel("Device memory", [
            _target(f"{mn.CUDA_ALLOCATED.prometheus}{SELECTOR}", "allocated", "A"),
            _target(f"{mn.CUDA_RESERVED.prometheus}{SELECTOR}", "reserved", "B"),
            _target(f"{mn.GPU_MEMORY_USAGE.prometheus}{SELECTOR}", "NVML used {{device}}", "C"),
            _target(f"{mn.GPU_MEMORY_LIMIT.prometheus}{SELECTOR}", "NVML total {{device}}", "D"),
        ], "bytes", 0, 24),
        _panel("Host memory", [
            _target(f"{mn.PROCESS_RSS.prometheus}{SELECTOR}", "RSS", "A"),
            _target(f"{mn.PINNED_HOST.prometheus}{SELECTOR}", "pinned", "B"),
        ], "bytes", 12, 24),
        _panel("Trouble: allocator retries, OOMs, dropped spans", [
            _target(f"increase({mn.ALLOC_RETRIES.prometheus}{SELECTOR}[$__rate_interval])", "alloc retries", "A"),
            _target(f"increase({mn.OOMS.prometheus}{SELECTOR}[$__rate_interval])", "OOMs", "B"),
            _target(f"increase({mn.SPANS_DROPPED.prometheus}{SELECTOR}[$__rate_interval])", "spans dropped", "C"),
        ], "short", 0, 32),
        {
            "type": "table",
            "title": "Slowest steps of a generation (Tempo)",
            "description": "Set the generation variable to a generation.id (run summary, logs or the generation span) to list the forwards that served it, slowest first. A step of one sequence names it in generation.id, a step of several in step.sequence.generation_ids (an array: Tempo 2.6 or later).",
            "datasource": {"type": "tempo", "uid": "${tempo}"},
            "gridPos": {"x": 12, "y": 32, "w": 12, "h": 8},
            "targets": [
                {
                    "datasource": {"type": "tempo", "uid": "${tempo}"},
                    "queryType": "traceql",
                    "query": '{ name="step" && (span.generation.id=~"$generation" || span.step.sequence.generation_ids=~"$generation") } | select(span.step.index, span.step.phase, span.step.sequences, duration)',
                    "limit": 20,
                    "refId": "A",
                }
            ],
        },
    ]
    return {
        "title": "tracedoffload",
        "uid": "tracedoffload",
        "schemaVersion": 39,
        "tags": ["tracedoffload", "offloading", "llm"],
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "templating": {
            "list": [
                {"name": "prometheus", "type": "datasource", "query": "prometheus"},
                {"name": "tempo", "type": "datasource", "query": "tempo"},
                {"name": "model", "type": "query", "datasource": {"type": "prometheus", "uid": "${prometheus}"}, "query": f"label_values({mn.STEPS.prometheus}, model)", "includeAll": True, "multi": True},
                {"name": "instance", "type": "query", "datasource": {"type": "prometheus", "uid": "${prometheus}"}, "query": f"label_values({mn.STEPS.prometheus}, instance)", "includeAll": True, "multi": True},
                {"name": "generation", "type": "textbox", "query": ".*", "label": "generation.id"},
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
