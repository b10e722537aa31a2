"""`tracedoffload serve` under load: prints figures (not a timed test).

Starts the server on loopback (the default model, `balanced` preset, default tracing, no trace
file) and drives it with the official `openai` client (AsyncOpenAI, streaming) at a bounded
concurrency of 1, 4 and 16, in rotating order for `--rounds` rounds. Per level it prints
generated tokens per second, time to first token and inter-token latency (p50, p95), and from the
server's own metrics (aggregated from its step spans) host-to-device bytes and forwards per
generated token. Then:

- (a) throughput at 16 / at 1 (medians over rounds; goal >= 6 on this CPU);
- (b) host-to-device bytes per generated token at 16 / at 1 (goal <= 1/10);
- (d) the telemetry's CPU (its thread and the export threads) over the engine thread's at 16,
  from the server's `tracedoffload_thread_cpu_seconds_total` (goal <= 0.005).

- (c) with `--compare-transformers DIR` (a save_pretrained directory of the same model, such as
  the default model's converted cache entry): at 16 requests at once, interleaved, tracedoffload's
  throughput over `transformers serve DIR --continuous-batching`'s (same KV sizing), with every
  layer resident (goal >= 1.0) and with the balanced preset offloaded.

    python bench/bench_serve.py --rounds 2 --max-tokens 32 [--compare-transformers DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

import openai

LEVELS = (1, 4, 16)
TOPICS = ["the sea", "a lighthouse", "a mountain village", "the first train", "a library at night", "a clockmaker", "winter birds", "an old bridge"]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            if 'thread="' in line:  # tracedoffload_thread_cpu_seconds_total, kept by thread
                name += ":" + line.split('thread="')[1].split('"')[0]
            found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> tuple[float, list[float], int]:
    """(time to first token, gaps between tokens, completion tokens) of one streamed request."""
    started = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return (stamps[0] - started if stamps else float("nan")), gaps, tokens


async def level(base: str, model: str, concurrency: int, requests: int, max_tokens: int, with_metrics: bool = True) -> dict[str, float]:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    before = metrics(base) if with_metrics else {}

    async def bounded(n: int) -> tuple[float, list[float], int]:
        async with gate:
            return await one_request(client, model, f"Write a long story about {TOPICS[n % len(TOPICS)]}.", max_tokens)

    started = time.perf_counter()
    results = await asyncio.gather(*(bounded(n) for n in range(requests)))
    wall = time.perf_counter() - started
    await client.close()
    tokens = sum(r[2] for r in results)
    if not with_metrics:
        return {"tokens_per_s": tokens / wall}
    await asyncio.sleep(1.0)  # the server's telemetry thread rests 0.25 s between batches
    after = metrics(base)
    generated = after["tracedoffload_generated_tokens_total"] - before.get("tracedoffload_generated_tokens_total", 0)
    copied = after["tracedoffload_transfer_bytes_total"] - before.get("tracedoffload_transfer_bytes_total", 0)
    steps = after["tracedoffload_steps_total"] - before.get("tracedoffload_steps_total", 0)
    cpu = {t: after.get(f"tracedoffload_thread_cpu_seconds_total:{t}", 0) - before.get(f"tracedoffload_thread_cpu_seconds_total:{t}", 0) for t in ("model", "telemetry", "export")}
    ttft = sorted(r[0] for r in results)
    gaps = sorted(g for r in results for g in r[1])
    return {
        "tokens_per_s": tokens / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_p95": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
        "itl_p50": statistics.median(gaps) if gaps else float("nan"),
        "itl_p95": gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))] if gaps else float("nan"),
        "bytes_per_token": copied / generated if generated else float("nan"),
        "forwards_per_token": steps / generated if generated else float("nan"),
        "telemetry_cpu_share": (cpu["telemetry"] + cpu["export"]) / cpu["model"] if cpu["model"] else float("nan"),
    }


def start_server(command: list[str], base: str) -> subprocess.Popen:
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=2):
                return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise SystemExit(f"{command[:4]} did not start") from None
            time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        os.kill(server.pid, signal.SIGKILL)


def serve_command(port: int, model: str | None, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "tracedoffload", "serve", "--port", str(port), "--max-batch-size", "16", "--max-batch-tokens", "512", "--max-context-tokens", "512", "--log-level", "warning", *extra]
    return command + (["--model", model] if model else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default=None, help="what serve's --model takes (default: the default model)")
    parser.add_argument("--compare-transformers", metavar="DIR", default=None, help="also measure (c) against `transformers serve DIR --continuous-batching`")
    parser.add_argument("--greedy-only", action="store_true", help="start the servers with --greedy-only (no per-request sampling warpers)")
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    extra = ["--greedy-only"] if args.greedy_only else []
    servers = [start_server(serve_command(port, args.model, *extra), base)]
    compare: dict[str, tuple[str, str]] = {}
    try:
        with urllib.request.urlopen(base + "/v1/models", timeout=5) as response:
            import json

            model = json.loads(response.read())["data"][0]["id"]
        if args.compare_transformers:
            resident_port, transformers_port = free_port(), free_port()
            servers.append(start_server(serve_command(resident_port, args.model, "--no-offload", *extra), f"http://127.0.0.1:{resident_port}"))
            servers.append(
                start_server(
                    ["transformers", "serve", args.compare_transformers, "--continuous-batching", "--host", "127.0.0.1", "--port", str(transformers_port),
                     "--device", "cpu", "--cb-block-size", "16", "--cb-num-blocks", str(16 * 32), "--cb-max-batch-tokens", "512", "--no-cb-use-cuda-graph"],
                    f"http://127.0.0.1:{transformers_port}",
                )
            )
            compare = {"resident": (f"http://127.0.0.1:{resident_port}", model), "transformers": (f"http://127.0.0.1:{transformers_port}", args.compare_transformers)}
        asyncio.run(level(base, model, 1, 1, 4))  # warm-up
        for target, name in compare.values():
            asyncio.run(level(target, name, 1, 1, 4, with_metrics=False))
        runs: dict[int, list[dict[str, float]]] = {c: [] for c in LEVELS}
        against: dict[str, list[float]] = {"balanced": [], "resident": [], "transformers": []}
        for round_index in range(args.rounds):
            order = list(LEVELS[round_index % 3 :] + LEVELS[: round_index % 3])
            for concurrency in order:
                runs[concurrency].append(asyncio.run(level(base, model, concurrency, max(4, 2 * concurrency), args.max_tokens)))
            if compare:
                against["balanced"].append(runs[16][-1]["tokens_per_s"])
                for key, (target, name) in compare.items():
                    against[key].append(asyncio.run(level(target, name, 16, 32, args.max_tokens, with_metrics=False))["tokens_per_s"])
    finally:
        for server in servers:
            stop_server(server)

    def median(concurrency: int, key: str) -> float:
        return statistics.median(run[key] for run in runs[concurrency])

    print(f"serve{' --greedy-only' if args.greedy_only else ''}, model {model}, balanced preset, {args.rounds} interleaved rounds, {args.max_tokens} max tokens per request, streamed (medians over rounds)")
    print(f"  {'concurrency':>11} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8} {'H2D MB/token':>13} {'forwards/token':>15}")
    for c in LEVELS:
        print(
            f"  {c:>11} {median(c, 'tokens_per_s'):9.2f} {median(c, 'ttft_p50') * 1e3:7.0f}ms {median(c, 'ttft_p95') * 1e3:7.0f}ms"
            f" {median(c, 'itl_p50') * 1e3:6.0f}ms {median(c, 'itl_p95') * 1e3:6.0f}ms {median(c, 'bytes_per_token') / 1e6:13.2f} {median(c, 'forwards_per_token'):15.3f}"
        )
    print(f"(a) throughput at 16 / at 1 = {median(16, 'tokens_per_s') / median(1, 'tokens_per_s'):.4f}   goal >= 6")
    print(f"(b) host-to-device bytes per generated token at 16 / at 1 = {median(16, 'bytes_per_token') / median(1, 'bytes_per_token'):.4f}   goal <= 0.1")
    if compare:
        theirs = statistics.median(against["transformers"])
        print(f"(c) at 16: transformers serve --continuous-batching {theirs:.2f} tokens/s; tracedoffload resident {statistics.median(against['resident']):.2f}, balanced {statistics.median(against['balanced']):.2f}")
        print(f"(c) tracedoffload resident / transformers = {statistics.median(against['resident']) / theirs:.4f}   goal >= 1.0")
        print(f"(c) tracedoffload balanced / transformers = {statistics.median(against['balanced']) / theirs:.4f}")
    print(f"(d) telemetry CPU / engine thread CPU at 16 = {median(16, 'telemetry_cpu_share'):.4f}   goal <= 0.005 (at 1: {median(1, 'telemetry_cpu_share'):.4f})")


if __name__ == "__main__":
    main()
