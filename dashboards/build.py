"""Builds the Grafana dashboards from tracedoffload.names (its metrics and span names), so they cannot
drift from what the code emits (tests/test_dashboard.py checks each committed file is what this builds):

- tracedoffload.json: the model (steps, layers, memory), for `run` and `serve` alike;
- tracedoffload-serve.json: the server (latency, throughput, queue, batch, KV cache, errors);
- tracedoffload-generation.json: one request drilled down in Tempo (its span, steps, layers).

    python dashboards/build.py      # rewrite all three
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's names, installed or not
from tracedoffload import names as mn  # noqa: E402

HERE = Path(__file__).parent
SERVE_JOB = "tracedoffload-serve"  # the scrape job of `serve` in collectors/prometheus/prometheus.yml


def _selector(*matchers: str) -> str:
    return "{" + ", ".join(['model=~"$model"', 'instance=~"$instance"', *matchers]) + "}"


SELECTOR = _selector()
# The three dashboards list each other in a drop-down (by their common tag).
LINKS = [{"type": "dashboards", "tags": ["tracedoffload"], "asDropdown": True, "title": "tracedoffload dashboards", "includeVars": False, "keepTime": True}]


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


def _p50_p95(metric: mn.MetricName, exemplar: bool = False) -> list[dict[str, Any]]:
    return [_target(_quantile(metric, 0.5), "p50", "A", exemplar), _target(_quantile(metric, 0.95), "p95", "B", exemplar)]


def _rate(metric: mn.MetricName, *matchers: str, by: str = "") -> str:
    return f"sum{f' by ({by}) ' if by else ''}(rate({metric.prometheus}{_selector(*matchers)}[$__rate_interval]))"


def _dashboard(title: str, uid: str, tags: list[str], variables: list[dict[str, Any]], panels: list[dict[str, Any]], *, since: str = "now-1h", refresh: str = "10s") -> dict[str, Any]:
    """A dashboard: its panels and variables, the shared links, Grafana's schema 39."""
    return {
        "title": title,
        "uid": uid,
        "schemaVersion": 39,
        "tags": tags,
        "time": {"from": since, "to": "now"},
        "refresh": refresh,
        "templating": {"list": variables},
        "panels": panels,
        "links": LINKS,
    }


def _label_variables(metric: mn.MetricName) -> list[dict[str, Any]]:
    """The `model` and `instance` variables, from `metric`'s label values."""
    return [
        {"name": label, "type": "query", "datasource": {"type": "prometheus", "uid": "${prometheus}"}, "query": f"label_values({metric.prometheus}, {label})", "includeAll": True, "multi": True}
        for label in ("model", "instance")
    ]


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
        _panel("Speculative decoding: drafted and kept tokens per second, and the share kept", [
            _target(_rate(mn.DRAFTED_TOKENS), "drafted/s", "A"),
            _target(_rate(mn.ACCEPTED_TOKENS), "kept/s", "B"),
            _target(f"{_rate(mn.ACCEPTED_TOKENS)} / {_rate(mn.DRAFTED_TOKENS)}", "acceptance rate", "C"),
        ], "short", 0, 40, description="run --prompt-lookup / --draft-model: every kept token is one the offloaded layers were not streamed again for."),
    ]
    variables = [
        {"name": "prometheus", "type": "datasource", "query": "prometheus"},
        {"name": "tempo", "type": "datasource", "query": "tempo"},
        *_label_variables(mn.STEPS),
        {"name": "generation", "type": "textbox", "query": ".*", "label": "generation.id"},
    ]
    return _dashboard("tracedoffload", "tracedoffload", ["tracedoffload", "offloading", "llm"], variables, panels)


def build_serve() -> dict[str, Any]:
    """The server: what a caller sees (latency, errors), why (queue, batch, KV cache, offload), and
    whether it is up. Per-request latencies carry exemplars: a dot opens that request's trace."""
    rejected = f'outcome="{mn.OUTCOME_REJECTED}"'
    answered = f'outcome!="{mn.OUTCOME_UNAUTHORIZED}"'  # 401s (scanners, bad keys) are not traffic served
    panels = [
        _panel("Request duration p50 / p95", _p50_p95(mn.REQUEST_DURATION, exemplar=True), "s", 0, 0, w=8,
               description="Per request, arrival to last token. Exemplars open the request's trace."),
        _panel("Time to first token p50 / p95 (objective: 99% under 2.5 s)", _p50_p95(mn.TIME_TO_FIRST_TOKEN, exemplar=True), "s", 8, 0, w=8,
               description="Includes the time in line. The alerts TracedOffloadTTFTBudgetBurnFast/Slow watch the objective."),
        _panel("Time per output token p50 / p95", _p50_p95(mn.TIME_PER_OUTPUT_TOKEN, exemplar=True), "s", 16, 0, w=8,
               description="After the first token; grows with the batch (every sequence shares each forward)."),
        _panel("Generated tokens per second", [
            _target(_rate(mn.GENERATED_TOKENS), "tokens/s", "A"),
        ], "short", 0, 8),
        _panel("Requests per second by outcome", [
            _target(_rate(mn.SERVER_REQUESTS, by=mn.LABEL_OUTCOME), "{{outcome}}", "A"),
        ], "reqps", 12, 8, description="rejected: 429, the line was full; unavailable: 503, draining or engine down; failed: 5xx."),
        _panel("Queue: requests waiting and in the batch", [
            _target(f"sum({mn.SERVER_REQUESTS_WAITING.prometheus}{SELECTOR})", "waiting", "A"),
            _target(f"sum({mn.SERVER_REQUESTS_RUNNING.prometheus}{SELECTOR})", "running", "B"),
        ], "short", 0, 16, description="Requests wait only while the batch is full (--max-batch-size); past --max-queue waiting they get 429."),
        _panel("Time in line p50 / p95", _p50_p95(mn.SERVER_QUEUE_DURATION, exemplar=True), "s", 12, 16),
        _panel("Batch: sequences per step p50 / p95", _p50_p95(mn.STEP_BATCH_SIZE), "short", 0, 24),
        _panel("Tokens per step p50 / p95 (prompt chunks and decodes together)", _p50_p95(mn.STEP_BATCH_TOKENS), "short", 12, 24,
               description="Bounded by --max-batch-tokens."),
        _panel("KV cache: bytes held by live sequences, and allocated", [
            _target(f"{mn.KV_CACHE_USAGE.prometheus}{SELECTOR}", "used {{instance}}", "A"),
            _target(f"{mn.KV_CACHE_LIMIT.prometheus}{SELECTOR}", "allocated {{instance}}", "B"),
        ], "bytes", 0, 32),
        _panel("Offload: host-to-device bytes per second", [
            _target(_rate(mn.BYTES_COPIED), "copied", "A"),
        ], "Bps", 12, 32),
        _panel("Up: engine takes requests (0: failed or draining), and Prometheus reaches /metrics", [
            _target(f"{mn.SERVER_ENGINE_UP.prometheus}{SELECTOR}", "engine {{instance}}", "A"),
            _target(f'up{{job="{SERVE_JOB}", instance=~"$instance"}}', "scrape {{instance}}", "B"),
        ], "short", 0, 40),
        _panel("Rejected (429) share of requests", [
            _target(f"{_rate(mn.SERVER_REQUESTS, rejected)} / {_rate(mn.SERVER_REQUESTS, answered)}", "429 share", "A"),
        ], "percentunit", 12, 40, description="TracedOffloadRequestsRejected pages above 5% for 5 minutes. 401s are left out of the whole."),
    ]
    variables = [{"name": "prometheus", "type": "datasource", "query": "prometheus"}, *_label_variables(mn.SERVER_REQUESTS)]
    return _dashboard("tracedoffload serve", "tracedoffload-serve", ["tracedoffload", "serve", "llm"], variables, panels)


def _traceql_table(title: str, query: str, description: str, y: int, h: int, table_type: str, limit: int, spss: int = 3) -> dict[str, Any]:
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": {"type": "tempo", "uid": "${tempo}"},
        "gridPos": {"x": 0, "y": y, "w": 24, "h": h},
        "targets": [{"datasource": {"type": "tempo", "uid": "${tempo}"}, "queryType": "traceql", "query": query, "tableType": table_type, "limit": limit, "spss": spss, "refId": "A"}],
    }


def build_generation() -> dict[str, Any]:
    """One request, from an id a caller or a log line gives: its request span, the forwards (step
    traces) that served it, and the layer spans of those forwards. A dashboard of its own: its
    variables are ids, not the fleet's model and instance, and it has no auto-refresh."""
    request_span = f'(name =~ "{mn.GEN_AI_OPERATION_CHAT} .*" || name =~ "{mn.GEN_AI_OPERATION} .*")'
    by_id = f'(span.{mn.REQUEST_ID} = "$request_id" || span.{mn.GENERATION_ID} = "$generation_id")'
    # A step of one sequence names it in generation.id; a step of several in an array, whose `=`
    # matches when any element does (Tempo's vParquet4 blocks, set in compose/tempo.yaml).
    steps = f'{{ name = "{mn.SPAN_STEP}" && (span.{mn.GENERATION_ID} = "$generation_id" || span.{mn.STEP_SEQUENCE_GENERATION_IDS} = "$generation_id") }}'
    layers = f'{{ name = "{mn.SPAN_TRANSFER}" || name = "{mn.SPAN_COMPUTE}" }}'

    def select(*attributes: str) -> str:
        return "select(" + ", ".join(f"span.{a}" for a in attributes) + ")"

    request_columns = select(mn.GENERATION_ID, mn.GEN_AI_RESPONSE_ID, mn.REQUEST_PRIORITY, mn.GENERATION_QUEUE_NS, mn.GENERATION_TTFT_NS,
                             mn.GENERATION_TPOT_NS, mn.GEN_AI_USAGE_INPUT_TOKENS, mn.GEN_AI_USAGE_OUTPUT_TOKENS, mn.GEN_AI_RESPONSE_FINISH_REASONS)
    step_columns = select(mn.STEP_INDEX, mn.STEP_PHASE, mn.STEP_SEQUENCES, mn.STEP_TOKENS, mn.STEP_TRANSFER_NS, mn.STEP_COMPUTE_NS, mn.STEP_WAIT_NS, mn.STEP_TRANSFER_BYTES)
    layer_columns = select(mn.LAYER_INDEX, mn.LAYER_BYTES, mn.LAYER_WAIT_NS, mn.LAYER_OVERLAP_NS)
    panels = [
        _traceql_table("The request: its span, found by request.id or generation.id",
                       f"{{ {request_span} && {by_id} }} | {request_columns}",
                       "request.id is the x-request-id of the answer (the caller's, or one the server made); generation.id is in the run summary, "
                       "the logs and this span. Copy its generation.id into the generation variable for the panels below. The queue and "
                       "time-to-first-token figures are nanoseconds.",
                       0, 6, "traces", 5),
        _traceql_table("Its steps: the forwards that served it (one trace each)",
                       f"{steps} | {step_columns}",
                       "Every forward that served the generation, alone or in a batch (step.sequences). The step.*_ns sums cover every "
                       "layer, exported or not; step.phase mixed is a continuous batch of prefills and decodes.",
                       6, 10, "spans", 500),
        _traceql_table("Its layers: transfer and compute spans of those steps",
                       f"{steps} > {layers} | {layer_columns}",
                       "Layer spans exist only for the steps the tail rule kept (the first ones, the slow ones, 1 in --sample-every); "
                       "each step span's step.layers.* arrays hold every layer's figures.",
                       16, 12, "spans", 50, spss=100),
    ]
    variables = [
        {"name": "tempo", "type": "datasource", "query": "tempo"},
        {"name": "request_id", "type": "textbox", "query": "", "label": "request.id"},
        {"name": "generation_id", "type": "textbox", "query": "", "label": "generation.id"},
    ]
    # Looked up by id, not watched: a longer window, no auto-refresh.
    return _dashboard("tracedoffload generation", "tracedoffload-generation", ["tracedoffload", "serve", "traces"], variables, panels, since="now-6h", refresh="")


DASHBOARDS = {"tracedoffload.json": build, "tracedoffload-serve.json": build_serve, "tracedoffload-generation.json": build_generation}


def render(name: str = "tracedoffload.json") -> str:
    return json.dumps(DASHBOARDS[name](), indent=2) + "\n"


if __name__ == "__main__":
    for name in DASHBOARDS:
        (HERE / name).write_text(render(name))
        print(f"wrote {HERE / name}")
