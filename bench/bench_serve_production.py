"""`tracedoffload serve` in production conditions: prints figures (not a timed test).

One server process per configuration, each on loopback (the default model, `balanced` preset,
unless `--model` says otherwise), driven with the official `openai` client (AsyncOpenAI, streamed
chat completions; plain ones for a model without a chat template), the configurations interleaved over `--rounds` rounds (the order rotates each
round); medians over rounds.

- (1) Priority under saturation: `--saturation` requests (default 40) arrive together at a server
  started with `--max-batch-size 4` (and a line long enough for all of them), one in
  `--high-every` (default 4) with priority 0 (high), the others with priority 2 (low). Time to
  first token p95 of the high class over that of the low class (goal <= 0.5): the high class is
  served first. Printed beside it: what strict priority would give if every request took the same
  time and the first prefill cost nothing (the first 4 arrivals start at once; then every high
  one, then every low one, 4 at a time): the figure's floor for this mix (with half of each,
  alternating, it is 0.5556 for 40 requests: the goal is out of reach whatever the server does).
- (2) The load counts of round 1's saturation run, on the client's side (sent, answered, 429,
  cancelled, lost) and the server's (`tracedoffload_server_requests_total` by outcome, over the run).
- (3) Throughput (generated tokens per second) at `--concurrency` requests at once (default 8;
  3 x that many requests per run, default `--max-batch-size` 8), with the OTLP endpoint
  unreachable (a closed loopback port, the default protocol; default tracing) over tracing off
  (`--trace-level off`): the cost of a collector that is down (goal >= 0.97). Run back to back in
  each round, so each round's ratio shares the machine's noisy phases; printed as the median of
  per-round ratios and the ratio of medians.

    python bench/bench_serve_production.py [--rounds 4] [--max-tokens 32] [--model random]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai

TOPICS = ["the sea", "a lighthouse", "a mountain village", "the first train", "a library at night", "a clockmaker", "winter birds", "an old bridge"]
HIGH, LOW = 0, 2
SATURATION_BATCH = 4
OUTCOMES = ("completed", "rejected", "cancelled", "failed", "invalid", "unauthorized", "unavailable")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """One `tracedoffload serve` process on a free port; its log in `log_dir`."""

    def __init__(self, name: str, model: str | None, flags: list[str], log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}.log"
        command = [sys.executable, "-m", "tracedoffload", "serve", "--port", str(self.port), "--log-level", "warning", *flags]
        command += ["--model", model] if model else []
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
        deadline = time.monotonic() + 600  # a first run converts the default model
        while True:
            try:
                with urllib.request.urlopen(self.base + "/ready", timeout=2):
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"the {name} server did not start:\n{self.log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        with urllib.request.urlopen(self.base + "/v1/models", timeout=10) as response:
            self.model_id = json.loads(response.read())["data"][0]["id"]
        self.chat = self._has_chat_template()

    def _has_chat_template(self) -> bool:
        """Whether /v1/chat/completions serves this model (the random model has no chat template)."""
        body = json.dumps({"model": self.model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).encode()
        request = urllib.request.Request(self.base + "/v1/chat/completions", data=body, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300):
                return True
        except urllib.error.HTTPError as error:
            if error.code == 400 and json.loads(error.read())["error"]["param"] == "messages":
                return False
            raise

    def outcomes(self) -> dict[str, float]:
        """`tracedoffload_server_requests_total` by outcome."""
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as response:
            text = response.read().decode()
        found = dict.fromkeys(OUTCOMES, 0.0)
        for line in text.splitlines():
            if line.startswith("tracedoffload_server_requests_total{"):
                outcome = line.split('outcome="')[1].split('"')[0]
                found[outcome] = found.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(30)


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int, priority: int | None = None, chat: bool = True) -> dict:
    """One streamed chat completion (a plain completion when the model has no chat template): its
    time to first token, tokens, and how it ended."""
    started = time.perf_counter()
    first = None
    tokens = 0
    finish = None
    options = {"model": model, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    if priority is not None:
        options["extra_body"] = {"priority": priority}
    try:
        if chat:
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **options)
        else:
            stream = await client.completions.create(prompt=prompt, **options)
        async for chunk in stream:
            if chunk.choices:
                text = chunk.choices[0].delta.content if chat else chunk.choices[0].text
                if first is None and text:
                    first = time.perf_counter() - started
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.RateLimitError:
        return {"outcome": "rejected", "priority": priority}
    except openai.APIStatusError as error:
        return {"outcome": f"status {error.status_code}", "priority": priority}
    outcome = "answered" if finish is not None else "no finish reason"
    return {"outcome": outcome, "priority": priority, "ttft": first, "tokens": tokens, "finish": finish}


def client_for(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=900)


async def saturate(server: Server, requests: int, max_tokens: int, high_every: int) -> list[dict]:
    """`requests` at once, one in `high_every` of priority high, the others low."""
    client = client_for(server)
    try:
        return await asyncio.gather(*(
            one_request(client, server.model_id, f"Write a long story about {TOPICS[n % len(TOPICS)]}.", max_tokens, HIGH if n % high_every == 0 else LOW, server.chat)
            for n in range(requests)
        ))
    finally:
        await client.close()


async def throughput(server: Server, concurrency: int, requests: int, max_tokens: int) -> float:
    """Generated tokens per second, `concurrency` at a time."""
    client = client_for(server)
    gate = asyncio.Semaphore(concurrency)

    async def bounded(n: int) -> dict:
        async with gate:
            return await one_request(client, server.model_id, f"Write a long story about {TOPICS[n % len(TOPICS)]}.", max_tokens, chat=server.chat)

    try:
        started = time.perf_counter()
        results = await asyncio.gather(*(bounded(n) for n in range(requests)))
        wall = time.perf_counter() - started
    finally:
        await client.close()
    bad = [r["outcome"] for r in results if r["outcome"] != "answered"]
    if bad:
        raise SystemExit(f"{server.name}: {len(bad)} requests not answered: {bad[:5]}")
    return sum(r["tokens"] for r in results) / wall


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)] if ordered else float("nan")


def strict_priority_floor(requests: int, slots: int, high_every: int) -> float:
    """TTFT p95 high / p95 low under strict priority, in service times: every request takes one,
    a first token comes when its request starts, the first `slots` arrivals (alternating classes)
    start at once, then the line by class (first come first served within one)."""
    arrivals = [HIGH if n % high_every == 0 else LOW for n in range(requests)]
    order = arrivals[:slots] + sorted(arrivals[slots:])  # sorted is stable
    starts: dict[int, list[float]] = {HIGH: [], LOW: []}
    for k, priority in enumerate(order):
        starts[priority].append(float(k // slots))
    return p95(starts[HIGH]) / p95(starts[LOW])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    parser.add_argument("--saturation", type=int, default=40, help="requests arriving together in (1) (default 40)")
    parser.add_argument("--high-every", type=int, default=4, help="in (1), one request in this many is of the high class (default 4; 2: half)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests at once in (3) (default 8)")
    parser.add_argument("--model", default=None, help="what serve's --model takes (default: the default model)")
    args = parser.parse_args()
    if args.rounds < 1 or args.max_tokens < 1 or args.saturation < 2 or args.concurrency < 1:
        parser.error("--rounds, --max-tokens and --concurrency are at least 1, --saturation at least 2")

    closed_port = free_port()  # bound and closed again: nothing listens there
    configurations = {
        "saturation": ["--max-batch-size", str(SATURATION_BATCH), "--max-queue", str(args.saturation), "--max-requests-per-client", "0"],
        "otlp-unreachable": ["--otlp-endpoint", f"http://127.0.0.1:{closed_port}", "--max-requests-per-client", "0"],
        "tracing-off": ["--trace-level", "off", "--max-requests-per-client", "0"],
    }
    servers: dict[str, Server] = {}
    high_p95: list[float] = []
    low_p95: list[float] = []
    high_p50: list[float] = []
    low_p50: list[float] = []
    ratios: list[float] = []
    rates: dict[str, list[float]] = {"otlp-unreachable": [], "tracing-off": []}
    counts: dict[str, object] = {}
    logs = Path(tempfile.mkdtemp(prefix="bench_serve_production-"))
    try:
        for name, flags in configurations.items():  # one after the other: a first run converts the model once
            servers[name] = Server(name, args.model, flags, logs)
        for server in servers.values():  # warm-up
            asyncio.run(throughput(server, 1, 1, 4))
        order = list(configurations)
        for round_index in range(args.rounds):
            rotated = order[round_index % len(order):] + order[: round_index % len(order)]
            for name in rotated:
                server = servers[name]
                if name == "saturation":
                    before = server.outcomes()
                    results = asyncio.run(saturate(server, args.saturation, args.max_tokens, args.high_every))
                    time.sleep(0.5)
                    after = server.outcomes()
                    high = [r["ttft"] for r in results if r["priority"] == HIGH and r.get("ttft") is not None]
                    low = [r["ttft"] for r in results if r["priority"] == LOW and r.get("ttft") is not None]
                    high_p95.append(p95(high))
                    low_p95.append(p95(low))
                    high_p50.append(statistics.median(high) if high else float("nan"))
                    low_p50.append(statistics.median(low) if low else float("nan"))
                    if round_index == 0:
                        seen = [r["outcome"] for r in results]
                        answered, rejected = seen.count("answered"), seen.count("rejected")
                        server_counts = {o: int(after[o] - before[o]) for o in OUTCOMES}
                        counts = {
                            "sent": len(results), "answered": answered, "429": rejected, "cancelled": server_counts["cancelled"],
                            "lost": len(results) - answered - rejected - server_counts["cancelled"],
                            "server": server_counts, "without_first_token": sum(1 for r in results if r["outcome"] == "answered" and r.get("ttft") is None),
                        }
                else:
                    rates[name].append(asyncio.run(throughput(server, args.concurrency, 3 * args.concurrency, args.max_tokens)))
            # Each round's throughput ratio: its two runs were adjacent in the rotation, or nearly.
            ratios.append(rates["otlp-unreachable"][-1] / rates["tracing-off"][-1])
    finally:
        for server in servers.values():
            server.stop()

    model = servers["saturation"].model_id
    median = statistics.median
    print(f"serve in production conditions, model {model}, balanced preset, {args.rounds} interleaved rounds, {args.max_tokens} max tokens per request, streamed {'chat' if servers['saturation'].chat else 'plain'} completions (medians over rounds)")
    print(f"(1) saturation: {args.saturation} requests at once (one in {args.high_every} priority {HIGH} = high, the others {LOW} = low) against --max-batch-size {SATURATION_BATCH}")
    print(f"    time to first token: high p50 {median(high_p50):.2f} s, p95 {median(high_p95):.2f} s; low p50 {median(low_p50):.2f} s, p95 {median(low_p95):.2f} s")
    per_round = [h / lo for h, lo in zip(high_p95, low_p95)]
    print(f"    TTFT p95 high / p95 low = {median(high_p95) / median(low_p95):.4f}   goal <= 0.5   (per round: {', '.join(f'{r:.4f}' for r in per_round)})")
    print(f"    strict priority with equal service times and free prefill would give {strict_priority_floor(args.saturation, SATURATION_BATCH, args.high_every):.4f} for this mix")
    server_counts = counts["server"]
    print(
        f"(2) load counts of round 1's saturation run: sent {counts['sent']}, answered {counts['answered']}, 429 {counts['429']}, "
        f"cancelled {counts['cancelled']}, lost {counts['lost']}   goal: lost = 0"
    )
    print(
        "    the server's counters over that run: " + ", ".join(f"{o} {server_counts[o]}" for o in OUTCOMES)
        + (f"; {counts['without_first_token']} answered without a content token" if counts["without_first_token"] else "")
    )
    unreachable, off = median(rates["otlp-unreachable"]), median(rates["tracing-off"])
    print(f"(3) throughput at {args.concurrency} at once ({3 * args.concurrency} requests per run): OTLP endpoint unreachable {unreachable:.2f} tokens/s, tracing off {off:.2f} tokens/s")
    print(f"    unreachable / off = {median(ratios):.4f} (median of per-round ratios; ratio of medians {unreachable / off:.4f})   goal >= 0.97")
    print(f"    (server logs in {logs})")


if __name__ == "__main__":
    main()
