"""`serve` for production, in this process over a tiny random Llama behind real uvicorn: the
caller's trace context (a real OpenTelemetry-instrumented client), request ids, the API key, the
server's metrics, content kept out of spans, the per-client limit, and the drain."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from opentelemetry import baggage, context
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tracedoffload import names
from tracedoffload.models.random_model import RANDOM_MODEL_NAME
from tracedoffload.serve.engine import EngineSettings
from tracedoffload.tracing.exporters.jsonl import read_otlp_jsonl
from tests.servers import start_serve
from tests.test_metrics import samples, value
from tests.test_serve_engine import Served, held

SETTINGS = EngineSettings(max_batch_size=2, max_batch_tokens=32, max_context_tokens=128, max_queue=32, default_max_tokens=8)
KEY = "s3cret-key"
SPAN = "text_completion tiny"


@pytest.fixture(scope="module")
def served():
    running = Served(SETTINGS, api_key=KEY)
    yield running
    running.stop()


def post(served: Served, body: dict[str, Any], key: str | None = KEY, headers: dict[str, str] | None = None, timeout: float = 60) -> httpx.Response:
    auth = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(served.base + "/v1/completions", json=body, headers={**auth, **(headers or {})}, timeout=timeout)


def request_spans(served: Served) -> dict[str, Any]:
    """The request spans finished so far, by their request id."""
    served.session.flush(10)
    return {s.attributes[names.REQUEST_ID]: s for s in served.exporter.get_finished_spans() if s.name == SPAN}


class TestTraceContext:
    def test_each_request_span_is_the_child_of_its_caller_under_load(self, served):
        """16 callers at once, each in its own trace, through the openai client on an httpx
        client instrumented by OpenTelemetry: each server span is the child of its own caller's
        HTTP span (none shared or swapped), carries the caller's baggage and tracestate, is a
        SERVER span, and its x-request-id is the one the answer carried."""
        provider = TracerProvider()
        client_spans = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(client_spans))
        tracer = provider.get_tracer("caller")
        http_client = httpx.Client(timeout=60)
        HTTPXClientInstrumentor.instrument_client(http_client, tracer_provider=provider)
        client = openai.OpenAI(base_url=served.base + "/v1", api_key=KEY, http_client=http_client, max_retries=0)

        def call(n: int) -> tuple[int, str]:
            token = context.attach(baggage.set_baggage("tenant", f"t{n}"))
            try:
                with tracer.start_as_current_span(f"caller {n}") as span:
                    raw = client.completions.with_raw_response.create(model="tiny", prompt=f"caller {n}", max_tokens=3, extra_headers={"x-request-id": f"req-{n}"})
                    return span.get_span_context().trace_id, raw.headers["x-request-id"]
            finally:
                context.detach(token)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            calls = list(pool.map(call, range(16)))
        HTTPXClientInstrumentor.uninstrument_client(http_client)
        assert [rid for _, rid in calls] == [f"req-{n}" for n in range(16)]
        http_spans = {s.context.trace_id: s for s in client_spans.get_finished_spans() if s.kind == SpanKind.CLIENT}
        spans = request_spans(served)
        for n, (trace_id, rid) in enumerate(calls):
            span, caller_http = spans[rid], http_spans[trace_id]
            assert span.context.trace_id == trace_id and span.parent.span_id == caller_http.context.span_id, n
            assert span.kind == SpanKind.SERVER and span.attributes["baggage.tenant"] == f"t{n}"

    def test_tracestate_goes_on_and_a_bad_traceparent_starts_a_new_trace(self, served):
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        good = post(served, {"model": "tiny", "prompt": "hi", "max_tokens": 2}, headers={"traceparent": parent, "tracestate": "vendor=abc"})
        bad = post(served, {"model": "tiny", "prompt": "hi", "max_tokens": 2}, headers={"traceparent": "00-zz-01", "x-request-id": "bad one!"})
        spans = request_spans(served)
        followed = spans[good.headers["x-request-id"]]
        assert f"{followed.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c" and followed.context.trace_state.get("vendor") == "abc"
        assert bad.headers["x-request-id"] != "bad one!"  # not sane: replaced
        assert spans[bad.headers["x-request-id"]].parent is None


    def test_the_request_span_keeps_its_attributes_when_the_event_loop_lags(self, served):
        """The manager's thread marks a request finished at once; its span ends only when the
        engine's side adds the request id and the rest, however late the event loop is (here
        held busy for a second while the request finishes)."""
        gate = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(1) as pool, held(served, gate):
            answer = pool.submit(post, served, {"model": "tiny", "prompt": "late loop", "max_tokens": 2, "priority": 1}, headers={"x-request-id": "lagging-loop"})
            deadline = time.monotonic() + 30
            while served.engine.in_flight < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            served.loop.call_soon_threadsafe(time.sleep, 1.0)
            time.sleep(0.05)
            gate.set()
            assert answer.result().status_code == 200
        span = request_spans(served)["lagging-loop"]
        assert span.attributes[names.REQUEST_PRIORITY] == 1 and span.attributes[names.GEN_AI_RESPONSE_ID].startswith("cmpl-")
        assert span.attributes[names.GENERATION_QUEUE_NS] >= 0


    def test_streams_closed_early_leave_one_cancelled_span_each_and_nothing_behind(self, served):
        """A cancelled request may stay in the manager's batch for a step after its generation
        ended: it must not come back as a generation of its own, and the engine keeps nothing
        per request once all are done."""
        def close_early(n: int) -> None:
            body = {"model": "tiny", "prompt": f"close {n}", "max_tokens": 100, "stream": True}
            with httpx.stream("POST", served.base + "/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}", "x-request-id": f"early-{n}"}, timeout=60) as response:
                next(line for line in response.iter_lines() if line.startswith("data: {"))

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            list(pool.map(close_early, range(12)))
        deadline = time.monotonic() + 30
        while served.engine.in_flight:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        spans = request_spans(served)
        assert all(spans[f"early-{n}"].attributes[names.GEN_AI_RESPONSE_FINISH_REASONS] == ("cancelled",) for n in range(12))
        served.session.flush(10)
        assert all(names.REQUEST_ID in s.attributes for s in served.exporter.get_finished_spans() if s.name == SPAN)
        assert served.engine._tracer._handles == {}  # nothing kept per request
        # The step in flight at a cancellation may still give the request an output: it has
        # nowhere to go, and the next request's end sweeps it (one more request, served whole).
        assert post(served, {"model": "tiny", "prompt": "after", "max_tokens": 4}).status_code == 200
        router = served.engine._manager.output_router
        assert router.result_handlers == {} and router.output_queue.empty()


class TestApiKey:
    @pytest.mark.parametrize("key", [None, "wrong", KEY[:-1]], ids=["none", "wrong", "almost"])
    def test_without_the_key_it_is_401_in_openai_s_shape(self, served, key):
        response = post(served, {"model": "tiny", "prompt": "hi"}, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer" and response.headers["x-request-id"]
        assert httpx.get(served.base + "/v1/models", timeout=10).status_code == 401

    def test_the_openai_client_with_the_key_works_and_probes_need_none(self, served):
        client = openai.OpenAI(base_url=served.base + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=served.base + "/v1", api_key="nope", max_retries=0).models.list()
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(served.base + path, timeout=10).status_code == 200, path


class TestContent:
    def test_prompts_and_answers_stay_out_of_spans_unless_recorded(self, served):
        rid = post(served, {"model": "tiny", "prompt": "private words", "max_tokens": 3}).headers["x-request-id"]
        span = request_spans(served)[rid]
        assert names.GEN_AI_INPUT_MESSAGES not in span.attributes and names.GEN_AI_OUTPUT_MESSAGES not in span.attributes
        assert "private words" not in json.dumps(dict(span.attributes))

    def test_with_record_content_they_are_on_the_span(self):
        running = Served(SETTINGS, record_content=True)
        try:
            response = httpx.post(running.base + "/v1/completions", json={"model": "tiny", "prompt": "private words", "max_tokens": 3}, timeout=60)
            (span,) = request_spans(running).values()
            assert json.loads(span.attributes[names.GEN_AI_INPUT_MESSAGES]) == [{"role": "user", "content": "private words"}]
            assert json.loads(span.attributes[names.GEN_AI_OUTPUT_MESSAGES]) == [{"role": "assistant", "content": response.json()["choices"][0]["text"]}]
        finally:
            running.stop()


class TestServerMetrics:
    def test_every_server_metric_is_recorded(self, served):
        """Each outcome counted once per request, the queue time with the request's trace as its
        exemplar, and the levels read from the engine (waiting, running, up, KV bytes)."""
        before = samples(httpx.get(served.base + "/metrics", headers={"accept": "application/openmetrics-text"}, timeout=10).text)
        ok = post(served, {"model": "tiny", "prompt": "count me", "max_tokens": 2})
        post(served, {"model": "tiny", "prompt": "hi", "max_tokens": 0})
        post(served, {"model": "tiny", "prompt": "hi"}, key="wrong")
        text = httpx.get(served.base + "/metrics", headers={"accept": "application/openmetrics-text"}, timeout=10).text
        found = samples(text)
        total = names.SERVER_REQUESTS.prometheus
        for outcome in ("completed", "invalid", "unauthorized"):
            assert value(found, total, outcome=outcome) == value(before, total, outcome=outcome) + 1, outcome
        assert value(found, total, outcome="rejected") == value(before, total, outcome="rejected")
        queue = [s for s in found[names.SERVER_QUEUE_DURATION.prometheus + "_bucket"] if s.exemplar is not None]
        span = request_spans(served)[ok.headers["x-request-id"]]
        assert f"{span.context.trace_id:032x}" in {s.exemplar.labels["trace_id"] for s in queue}
        assert value(found, names.SERVER_REQUESTS_WAITING.prometheus) == 0 and value(found, names.SERVER_REQUESTS_RUNNING.prometheus) == 0
        assert value(found, names.SERVER_ENGINE_UP.prometheus) == 1
        limit = value(found, names.KV_CACHE_LIMIT.prometheus)
        assert limit > 0 and 0 <= value(found, names.KV_CACHE_USAGE.prometheus) <= limit

    def test_levels_while_requests_run_and_wait(self, served):
        """Held in its forward, the engine has 2 requests running and 1 waiting, holding KV pages."""
        gate = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(3) as pool, held(served, gate):
            futures = [pool.submit(post, served, {"model": "tiny", "prompt": f"level {n}", "max_tokens": 4}) for n in range(3)]
            deadline = time.monotonic() + 30
            while served.engine.in_flight < 3:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            found = samples(httpx.get(served.base + "/metrics", headers={"accept": "application/openmetrics-text"}, timeout=10).text)
            gate.set()
            assert all(f.result().status_code == 200 for f in futures)
        assert value(found, names.SERVER_REQUESTS_RUNNING.prometheus) == 2 and value(found, names.SERVER_REQUESTS_WAITING.prometheus) == 1
        assert value(found, names.KV_CACHE_USAGE.prometheus) > 0


    def test_the_server_metrics_reach_the_opentelemetry_sdk(self, served):
        """The same instruments over OTLP: counted outcomes, the queue time with the request's
        trace as exemplar, and the levels observed from the engine when the reader collects."""
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from prometheus_client import CollectorRegistry
        from opentelemetry.trace import SpanContext

        from tracedoffload.serve.metrics import ServerMetrics

        reader = InMemoryMetricReader()
        metrics = ServerMetrics("tiny", CollectorRegistry(), MeterProvider(metric_readers=[reader]))
        metrics.watch(served.engine)
        metrics.request_ended(names.OUTCOME_REJECTED)
        metrics.queued(0.25, SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=1))
        found = {m.name: m for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
        (rejected,) = [p for p in found[names.SERVER_REQUESTS.otel].data.data_points if p.attributes[names.LABEL_OUTCOME] == names.OUTCOME_REJECTED]
        assert rejected.value == 1
        (queued,) = found[names.SERVER_QUEUE_DURATION.otel].data.data_points
        assert queued.count == 1 and queued.exemplars[0].trace_id == 0xABC
        for level in (names.SERVER_REQUESTS_WAITING, names.SERVER_REQUESTS_RUNNING, names.SERVER_ENGINE_UP, names.KV_CACHE_USAGE, names.KV_CACHE_LIMIT):
            assert found[level.otel].unit == level.unit and found[level.otel].data.data_points, level.otel
        (up,) = found[names.SERVER_ENGINE_UP.otel].data.data_points
        assert up.value == 1


class TestLimits:
    def test_one_client_cannot_hold_more_than_its_share(self):
        running = Served(EngineSettings(max_batch_size=2, max_batch_tokens=32, max_context_tokens=128, max_queue=8, default_max_tokens=8, max_per_client=2))
        gate = threading.Event()
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as pool, held(running, gate):
                futures = [pool.submit(httpx.post, running.base + "/v1/completions", json={"model": "tiny", "prompt": "mine"}, timeout=60) for _ in range(2)]
                deadline = time.monotonic() + 30
                while running.engine.in_flight < 2:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                third = httpx.post(running.base + "/v1/completions", json={"model": "tiny", "prompt": "one more"}, timeout=60)
                gate.set()
                assert [f.result().status_code for f in futures] == [200, 200]
            assert third.status_code == 429 and "--max-requests-per-client" in third.json()["error"]["message"] and third.headers["retry-after"]
        finally:
            running.stop()


class TestDrain:
    def test_draining_refuses_new_requests_finishes_the_rest_and_cuts_off_at_the_deadline(self):
        """Mid-drain: /ready is 503 and a new request gets 503 while the two in flight go on;
        at the cut-off both end with finish reason error (one streamed, one not)."""
        running = Served(SETTINGS)
        gate = threading.Event()
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as pool, held(running, gate):
                plain = pool.submit(httpx.post, running.base + "/v1/completions", json={"model": "tiny", "prompt": "plain", "max_tokens": 50}, timeout=60)

                def stream() -> list[dict]:
                    with httpx.stream("POST", running.base + "/v1/completions", json={"model": "tiny", "prompt": "streamed", "max_tokens": 50, "stream": True}, timeout=60) as response:
                        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]

                streamed = pool.submit(stream)
                deadline = time.monotonic() + 30
                while running.engine.in_flight < 2:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                running.engine.begin_drain()
                ready = httpx.get(running.base + "/ready", timeout=10)
                refused = httpx.post(running.base + "/v1/completions", json={"model": "tiny", "prompt": "late"}, timeout=10)
                running.server_loop_call(running.engine.cut_off)
                gate.set()
                answer, events = plain.result(), streamed.result()
            assert ready.status_code == 503 and "draining" in ready.json()["reason"]
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
            assert answer.json()["choices"][0]["finish_reason"] == "error"
            assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["error"]
            spans = request_spans(running)
            assert sorted(s.attributes["gen_ai.response.finish_reasons"][0] for s in spans.values()) == ["error", "error"]
        finally:
            running.stop()


def start_server(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`tracedoffload serve` on the random model (fast to load), ready; its log in `tmp_path`."""
    return start_serve(["--model", "random", *flags], tmp_path / "serve.log", {**os.environ, **(env or {})})


class TestTheProcess:
    def test_sigterm_drains_answers_everyone_sends_the_spans_and_exits_0(self, tmp_path):
        """Two streams, then SIGTERM while the long one runs: /ready turns 503 and a new request gets 503 at
        once; each stream ends with a finish reason (its own, or `error` at the 3 s cut-off: the
        host's speed decides which, never whether); the process exits 0 and its trace file holds
        both request spans with the same finish reasons."""
        trace_file = tmp_path / "serve.otlp.jsonl"
        process, base = start_server(tmp_path, "--trace-level", "token", "--trace-file", str(trace_file), "--drain-timeout", "3", "--max-context-tokens", "4096")
        try:
            def stream(max_tokens: int) -> list[dict]:
                body = {"model": RANDOM_MODEL_NAME, "prompt": "drain me", "max_tokens": max_tokens, "stream": True}
                with httpx.stream("POST", base + "/v1/completions", json=body, headers={"x-request-id": f"drain-{max_tokens}"}, timeout=120) as response:
                    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                streams = {n: pool.submit(stream, n) for n in (16, 4000)}
                # A stream that failed at once (a bad request) would leave nothing running: say so.
                time.sleep(0.2)
                assert not any(f.done() and not f.result() for f in streams.values()), "a stream got no events"
                deadline = time.monotonic() + 60
                while _running(base) < 1:  # the long one, at least (the short one may be done)
                    assert time.monotonic() < deadline, "the streams never ran"
                    time.sleep(0.05)
                process.send_signal(signal.SIGTERM)
                ready = httpx.get(base + "/ready", timeout=10)
                refused = httpx.post(base + "/v1/completions", json={"model": RANDOM_MODEL_NAME, "prompt": "late"}, timeout=10)
                ends = {n: [c["finish_reason"] for e in f.result() for c in e["choices"] if c["finish_reason"]] for n, f in streams.items()}
            assert process.wait(60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(30)
        assert ready.status_code == 503 and refused.status_code == 503
        assert ends[16] in (["length"], ["error"]) and ends[4000] in (["length"], ["error"])
        spans = {s.attributes.get(names.REQUEST_ID): s for s in read_otlp_jsonl(trace_file) if s.name == f"text_completion {RANDOM_MODEL_NAME}"}
        assert {rid: s.attributes[names.GEN_AI_RESPONSE_FINISH_REASONS] for rid, s in spans.items()} == {f"drain-{n}": tuple(ends[n]) for n in (16, 4000)}

    def test_binding_beyond_loopback_without_a_key_is_refused(self):
        result = subprocess.run([sys.executable, "-m", "tracedoffload", "serve", "--model", "random", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "host" in result.stderr and "--api-key" in result.stderr and "--allow-unauthenticated" in result.stderr

    def test_the_key_comes_from_the_environment(self, tmp_path):
        process, base = start_server(tmp_path, "--trace-level", "off", env={"TRACEDOFFLOAD_API_KEY": "from-env"})
        try:
            assert httpx.get(base + "/v1/models", timeout=10).status_code == 401
            assert httpx.get(base + "/v1/models", headers={"authorization": "Bearer from-env"}, timeout=10).status_code == 200
            # With tracing off the server's own metrics are still served.
            assert names.SERVER_REQUESTS.prometheus in httpx.get(base + "/metrics", timeout=10).text
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0


def _running(base: str) -> float:
    found = samples(httpx.get(base + "/metrics", headers={"accept": "application/openmetrics-text"}, timeout=10).text)
    return value(found, names.SERVER_REQUESTS_RUNNING.prometheus)
