"""`tracedoffload serve` under load while its telemetry is in trouble, in a real process.

Each phase starts `tracedoffload serve --model random` with its OTLP exporter pointed at trouble
(a closed port, or a collector that takes 2 s to answer every POST), drives it with the official
`openai` client (AsyncOpenAI) at 16 requests at once, 200 requests in all: streamed and not,
priorities 0, 1 and 2, about 10% closed by the client after their first event, about 10%
malformed (raw httpx), each with its own x-request-id. The batch (8) and the line (6) hold 14,
so the line fills and some requests get 429 (a caller waits its Retry-After before its next one).
Then, counting by request id on the client's side against the server's own records:

- every well-formed request got a whole answer (a finish reason; a stream ending in [DONE]) or
  a 429; every malformed one a 4xx in OpenAI's error shape naming the problem;
- the server's outcome counters equal the client's counts (completed, rejected, cancelled,
  invalid; nothing failed or unavailable);
- its trace file (read after SIGTERM and exit status 0) holds exactly one request span per
  request that reached the engine, with the finish reason the client saw (`cancelled` for the
  closed streams) and its priority: none lost, none duplicated;
- the leak detector raised nothing, and resident memory after the load is within a bound of its
  level before it.

Nothing here depends on the host's speed: how many get 429 depends on it, and both sides count
them; a stream closed early asks for 1500 tokens, so it is far from its end when it is closed. Bounded (every wait has a deadline), loopback only, and it stops its server and its
collector by itself. `pytest -s` shows each phase's counts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.server
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.servers import free_port, start_serve
from tests.test_metrics import samples, value
from tracedoffload import names
from tracedoffload.models.random_model import RANDOM_MODEL_NAME
from tracedoffload.tracing.exporters.jsonl import read_otlp_jsonl

REQUESTS = 200
CONCURRENCY = 16
WARM_UP_REQUESTS = 32  # the same mix before the idle reading: allocators and arenas reach their plateau
MAX_BATCH = 8
MAX_QUEUE = 6  # 14 places for 16 callers: the line fills, and some get 429
CANCEL_MAX_TOKENS = 1500  # a closed stream is far from its end when the server sees it go (~1500 steps)
SLOW_COLLECTOR_S = 2.0
SPAN = f"text_completion {RANDOM_MODEL_NAME}"

# Resident memory after the load (and 2 s idle) over the idle level before it, after a warm-up of
# the same mix. Measured here (2-core CPU, random model, 200 requests, about 155 of them reaching
# the engine): +1.1 to +5.1 MiB in either phase (glibc arenas, Python's caches, the OTLP
# exporter's queue while its collector is unreachable or slow). 32 MiB is 6 times that, and still
# fails a leak of 0.25 MiB per request that reaches the engine (about 39 MiB), let alone 1 MiB per
# request (about 155 MiB).
RSS_GROWTH_BOUND = 32 << 20

WORDS = ["harbour", "lantern", "granite", "orchard", "meridian", "cobalt", "thistle", "quarry", "ember", "tide"]


@dataclasses.dataclass(frozen=True)
class Planned:
    rid: str
    kind: str  # plain, stream, cancel, or malformed
    priority: int
    max_tokens: int
    prompt: str
    malformed: str | None = None  # which mistake


@dataclasses.dataclass
class Seen:
    """What the client saw of one request."""

    planned: Planned
    status: int
    outcome: str  # a names.OUTCOME_*, or "unexpected"
    finish: str | None = None
    echoed_id: str | None = None
    detail: str = ""
    retry_after_s: float = 0.0


# Each mistake: how it is sent, and the status, `param` and words the answer must have.
MALFORMED: dict[str, dict[str, Any]] = {
    "bad-json": {"content": b'{"model": "%s", "prompt": "half a body",' % RANDOM_MODEL_NAME.encode(), "status": 400, "param": None, "words": "not JSON"},
    "negative-max-tokens": {"json": {"model": RANDOM_MODEL_NAME, "prompt": "hi", "max_tokens": -1}, "status": 400, "param": "max_tokens", "words": "max_tokens: -1"},
    "unknown-model": {"json": {"model": "no-such-model", "prompt": "hi"}, "status": 404, "param": "model", "words": "'no-such-model' does not exist", "code": "model_not_found"},
    "bad-priority": {"json": {"model": RANDOM_MODEL_NAME, "prompt": "hi", "priority": "high"}, "status": 400, "param": "priority", "words": "priority: 'high'"},
    "chat-without-template": {"json": {"model": RANDOM_MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}, "path": "/v1/chat/completions", "status": 400, "param": "messages", "words": "no chat template"},
}


def plan(count: int, prefix: str, seed: int) -> list[Planned]:
    """`count` requests: 10% cancelled, 10% malformed, the rest half streamed, in a seeded order."""
    rng = random.Random(seed)
    cancelled = malformed = round(count * 0.1)
    rest = count - cancelled - malformed
    kinds = ["cancel"] * cancelled + ["malformed"] * malformed + ["stream"] * (rest // 2) + ["plain"] * (rest - rest // 2)
    rng.shuffle(kinds)
    mistakes = list(MALFORMED)
    planned = []
    for n, kind in enumerate(kinds):
        prompt = f"request {n}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        planned.append(Planned(
            rid=f"{prefix}-{n}", kind=kind, priority=rng.choice((0, 1, 2)),
            max_tokens=CANCEL_MAX_TOKENS if kind == "cancel" else rng.randint(2, 12), prompt=prompt,
            malformed=mistakes[n % len(mistakes)] if kind == "malformed" else None,
        ))
    return planned


async def send(client: openai.AsyncOpenAI, raw: httpx.AsyncClient, p: Planned) -> Seen:
    """One request, as its kind says; what the client saw of it."""
    headers = {"x-request-id": p.rid}
    body: dict[str, Any] = {"model": RANDOM_MODEL_NAME, "prompt": p.prompt, "max_tokens": p.max_tokens, "extra_body": {"priority": p.priority}, "extra_headers": headers}
    if p.kind == "malformed":
        return await send_malformed(raw, p)
    try:
        if p.kind == "plain":
            response = await client.completions.with_raw_response.create(**body)
            answer = response.parse()
            return Seen(p, response.status_code, names.OUTCOME_COMPLETED, answer.choices[0].finish_reason, response.headers.get("x-request-id"))
        if p.kind == "stream":
            async with client.completions.with_streaming_response.create(**body, stream=True) as response:
                finishes, done, errors = [], False, []
                async for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    assert not done, f"{p.rid}: an event after [DONE]"
                    event = json.loads(line[6:])
                    errors += [event["error"]] if "error" in event else []
                    finishes += [c["finish_reason"] for c in event.get("choices", []) if c.get("finish_reason")]
                whole = done and len(finishes) == 1 and not errors
                return Seen(p, response.status_code, names.OUTCOME_COMPLETED if whole else "unexpected", finishes[0] if len(finishes) == 1 else None,
                            response.headers.get("x-request-id"), "" if whole else f"finishes {finishes}, [DONE] {done}, errors {errors}")
        # cancel: the official client's stream, closed after its first event
        stream = await client.completions.create(**body, stream=True)
        echoed = stream.response.headers.get("x-request-id")
        first = None
        async for chunk in stream:
            first = chunk
            break
        await stream.close()
        finish = first.choices[0].finish_reason if first is not None and first.choices else None
        ok = first is not None and finish is None  # closed before its end
        return Seen(p, 200, names.OUTCOME_CANCELLED if ok else "unexpected", None, echoed, "" if ok else f"first event {first}")
    except openai.RateLimitError as error:
        shape = error.body if isinstance(error.body, dict) else {}
        retry_after = error.response.headers.get("retry-after", "")
        ok = retry_after.isdigit() and shape.get("code") == "rate_limit_exceeded"
        return Seen(p, 429, names.OUTCOME_REJECTED if ok else "unexpected", None, error.response.headers.get("x-request-id"),
                    "" if ok else f"429 without Retry-After or code: {error.body}", float(retry_after) if ok else 0.0)
    except openai.APIStatusError as error:
        return Seen(p, error.status_code, "unexpected", None, error.response.headers.get("x-request-id"), f"{error.status_code}: {error.body}")


async def send_malformed(raw: httpx.AsyncClient, p: Planned) -> Seen:
    mistake = MALFORMED[p.malformed]
    path = mistake.get("path", "/v1/completions")
    headers = {"x-request-id": p.rid, "content-type": "application/json"}
    if "content" in mistake:
        response = await raw.post(path, content=mistake["content"], headers=headers)
    else:
        response = await raw.post(path, json=mistake["json"], headers=headers)
    problems = []
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = None
        problems.append(f"not OpenAI's error shape: {response.text[:200]}")
    if error is not None:
        if set(error) != {"message", "type", "param", "code"}:
            problems.append(f"error fields {sorted(error)}")
        if error.get("param") != mistake["param"] or mistake["words"] not in str(error.get("message")):
            problems.append(f"does not name the problem ({mistake['param']!r}, {mistake['words']!r}): {error}")
        if error.get("code") != mistake.get("code", error.get("code")) or error.get("type") not in ("invalid_request_error", "not_found_error"):
            problems.append(f"type or code: {error}")
    if response.status_code != mistake["status"]:
        problems.append(f"status {response.status_code}, not {mistake['status']}")
    return Seen(p, response.status_code, "unexpected" if problems else names.OUTCOME_INVALID, None, response.headers.get("x-request-id"), "; ".join(problems))


async def drive(base: str, planned: list[Planned], concurrency: int) -> list[Seen]:
    """Every planned request, `concurrency` at a time (a caller refused with 429 waits its Retry-After)."""
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)  # no retries: one request per id
    raw = httpx.AsyncClient(base_url=base, timeout=60)
    pending = iter(planned)
    seen: list[Seen] = []

    async def caller() -> None:
        for p in pending:  # shared: each planned request is taken by one caller
            result = await send(client, raw, p)
            seen.append(result)
            if result.outcome == names.OUTCOME_REJECTED:
                await asyncio.sleep(result.retry_after_s)  # as a polite client does

    try:
        await asyncio.wait_for(asyncio.gather(*(caller() for _ in range(concurrency))), timeout=300)
    finally:
        await client.close()
        await raw.aclose()
    return seen


# -- the server, its collector, its readings -------------------------------------------------------


class _SlowCollector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that takes its time: reads the POST, sleeps, answers 200 (an empty
    protobuf message is a valid Export*ServiceResponse)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.posts.append(self.path)  # type: ignore[attr-defined]
        time.sleep(SLOW_COLLECTOR_S)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def start_server(tmp_path: Path, flags: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str, Path, Path]:
    """The server on the random model with this test's bounds, ready: (process, base URL, its trace file, its log)."""
    trace_file, log_file = tmp_path / "serve.otlp.jsonl", tmp_path / "serve.log"
    flags = [
        "--model", "random", "--max-batch-size", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE), "--max-requests-per-client", "0",
        "--trace-level", "token", "--trace-file", str(trace_file), "--drain-timeout", "30", *flags,
    ]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    process, base = start_serve(flags, log_file, {**clean, **env})
    return process, base, trace_file, log_file


def scrape(base: str) -> dict[str, list]:
    return samples(httpx.get(base + "/metrics", headers={"accept": "application/openmetrics-text"}, timeout=10).text)


def outcomes(found: dict[str, list]) -> dict[str, float]:
    return {outcome: value(found, names.SERVER_REQUESTS.prometheus, outcome=outcome) for outcome in names.OUTCOMES}


def settle(base: str, before: dict[str, float], sent: int) -> dict[str, list]:
    """The metrics once every request sent has ended in the server's counters and nothing runs or
    waits (a closed stream is counted when the server notices it left); bounded."""
    deadline = time.monotonic() + 30
    while True:
        found = scrape(base)
        counted = sum(outcomes(found)[o] - before[o] for o in names.OUTCOMES)
        idle = value(found, names.SERVER_REQUESTS_RUNNING.prometheus) == 0 and value(found, names.SERVER_REQUESTS_WAITING.prometheus) == 0
        if (counted >= sent and idle) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def resident_bytes(pid: int) -> int:
    """VmRSS, the median of five readings 0.2 s apart."""
    readings = []
    for _ in range(5):
        with open(f"/proc/{pid}/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        readings.append(kib * 1024)
        time.sleep(0.2)
    return sorted(readings)[2]


def stop(process: subprocess.Popen, log_file: Path) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        status = process.wait(90)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)
        raise AssertionError(f"the server did not stop within 90 s of SIGTERM:\n{log_file.read_text()[-3000:]}") from None
    assert status == 0, f"exit status {status}:\n{log_file.read_text()[-3000:]}"


# -- the test ----------------------------------------------------------------------------------------


PHASES = {
    # Through the standard variables; nothing listens on the port.
    "otlp-closed-port": lambda port: ([], {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}),
    # Through the flags; the collector answers every POST after 2 s.
    "otlp-slow-collector": lambda port: (["--otlp-endpoint", f"http://127.0.0.1:{port}", "--otlp-protocol", "http/protobuf"], {}),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_load_with_the_otlp_collector_in_trouble(tmp_path: Path, phase: str) -> None:
    collector = None
    if phase == "otlp-slow-collector":
        collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowCollector)
        collector.posts = []  # type: ignore[attr-defined]
        threading.Thread(target=collector.serve_forever, daemon=True).start()
        port = collector.server_port
    else:
        port = free_port()  # bound and closed again: refused
    flags, env = PHASES[phase](port)
    started = time.monotonic()
    process, base, trace_file, log_file = start_server(tmp_path, flags, env)
    try:
        initial = outcomes(scrape(base))
        warm = asyncio.run(drive(base, plan(WARM_UP_REQUESTS, "warm", seed=1), CONCURRENCY))
        before = outcomes(settle(base, initial, len(warm)))
        time.sleep(2.0)
        idle_rss = resident_bytes(process.pid)

        seen = asyncio.run(drive(base, plan(REQUESTS, "load", seed=2), CONCURRENCY))
        found = settle(base, before, len(seen))
        time.sleep(2.0)
        loaded_rss = resident_bytes(process.pid)
        after = outcomes(found)
        leak_flags = {s.labels.get("source"): s.value for s in found.get(names.LEAK_SUSPECTED.prometheus, [])}
        dropped = value(found, names.SPANS_DROPPED.prometheus) if names.SPANS_DROPPED.prometheus in found else None
    finally:
        if process.poll() is None:
            stop(process, log_file)
        if collector is not None:
            collector.shutdown()
            collector.server_close()
    duration = time.monotonic() - started

    # What each side counted, printed first (`pytest -s`), so that a failing run shows it too.
    by_id = {s.planned.rid: s for s in seen}
    client_counts = Counter(s.outcome for s in seen)
    server_counts = {o: int(after[o] - before[o]) for o in names.OUTCOMES}
    spans = [s for s in read_otlp_jsonl(trace_file) if s.name == SPAN]
    unnamed = [s for s in spans if names.REQUEST_ID not in s.attributes]
    ids = Counter(s.attributes[names.REQUEST_ID] for s in spans if names.REQUEST_ID in s.attributes)
    duplicated = sorted(rid for rid, n in ids.items() if n > 1)
    engine_ids = {s.planned.rid for s in seen if s.outcome in (names.OUTCOME_COMPLETED, names.OUTCOME_CANCELLED)}
    load_ids = {rid for rid in ids if rid.startswith("load-")}
    lost, extra = sorted(engine_ids - load_ids), sorted(load_ids - engine_ids)
    growth = loaded_rss - idle_rss
    kinds = Counter(s.planned.kind for s in seen)
    print(
        f"\n{phase}: sent {len(seen)} (well-formed {len(seen) - kinds['malformed']}: {kinds['plain']} plain, {kinds['stream']} streamed, {kinds['cancel']} to close early; "
        f"{kinds['malformed']} malformed), answered {client_counts[names.OUTCOME_COMPLETED]}, 429 {client_counts[names.OUTCOME_REJECTED]}, "
        f"cancelled {client_counts[names.OUTCOME_CANCELLED]}, malformed {client_counts[names.OUTCOME_INVALID]}, unexpected {client_counts['unexpected']}, "
        f"lost {len(lost)}, duplicated {len(duplicated)}, spans without {names.REQUEST_ID} {len(unnamed)}; "
        f"server counted {', '.join(f'{o} {n}' for o, n in server_counts.items() if n)}; request spans {len(spans)} (load {len(load_ids)}); "
        f"RSS idle {idle_rss / 2**20:.1f} MiB, after {loaded_rss / 2**20:.1f} MiB ({growth / 2**20:+.1f}); leak flags {leak_flags}; "
        f"{names.SPANS_DROPPED.prometheus} on /metrics {dropped}; "
        + (f"collector POSTs {len(collector.posts)}; " if collector is not None else "")
        + f"{duration:.1f} s"
    )

    # -- the client's own view: every request answered as it should be -------------------------
    assert len(seen) == REQUESTS and len(by_id) == REQUESTS, "a request was sent twice or never"
    unexpected = [f"{s.planned.rid} ({s.planned.kind} {s.planned.malformed or ''}): {s.status} {s.detail}" for s in seen if s.outcome == "unexpected"]
    assert not unexpected, "\n".join(unexpected)
    assert [s.planned.rid for s in seen if s.echoed_id != s.planned.rid] == [], "an answer without its x-request-id"
    for s in seen:
        if s.planned.kind == "malformed":
            assert s.outcome == names.OUTCOME_INVALID, s
        elif s.planned.kind == "cancel":
            assert s.outcome in (names.OUTCOME_CANCELLED, names.OUTCOME_REJECTED), s
        else:
            assert s.outcome in (names.OUTCOME_COMPLETED, names.OUTCOME_REJECTED), s
            assert s.outcome == names.OUTCOME_REJECTED or s.finish == "length", s  # the random model has no eos

    # -- the server's counters equal the client's counts -----------------------------------------
    assert server_counts == {o: client_counts.get(o, 0) for o in names.OUTCOMES}, (server_counts, dict(client_counts))

    # -- the trace file: one request span per request that reached the engine -------------------
    assert not unnamed, (
        f"{len(unnamed)} of {len(spans)} request spans carry no {names.REQUEST_ID} (nor {names.REQUEST_PRIORITY}, {names.GEN_AI_RESPONSE_ID}): "
        f"{[(s.attributes.get(names.GEN_AI_REQUEST_MAX_TOKENS), s.attributes.get(names.GEN_AI_RESPONSE_FINISH_REASONS)) for s in unnamed]} (max_tokens, finish)"
    )
    assert not duplicated and not lost and not extra, f"duplicated {duplicated}, lost {lost}, never answered {extra}"
    for span in spans:
        rid = span.attributes[names.REQUEST_ID]
        if rid in by_id:
            s = by_id[rid]
            expected = "cancelled" if s.outcome == names.OUTCOME_CANCELLED else s.finish
            assert span.attributes[names.GEN_AI_RESPONSE_FINISH_REASONS] == (expected,), (rid, span.attributes[names.GEN_AI_RESPONSE_FINISH_REASONS], expected)
            assert span.attributes[names.REQUEST_PRIORITY] == s.planned.priority, rid

    # -- no leak alert, and memory back near its idle level ---------------------------------------
    assert leak_flags and all(v == 0 for v in leak_flags.values()), leak_flags
    assert growth <= RSS_GROWTH_BOUND, f"resident memory grew by {growth / 2**20:.1f} MiB over the load (bound {RSS_GROWTH_BOUND / 2**20:.0f} MiB)"
    if collector is not None:
        assert any(path.endswith("/v1/traces") for path in collector.posts), collector.posts  # the slow collector was really used
