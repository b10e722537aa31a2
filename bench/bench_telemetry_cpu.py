"""CPU time of the telemetry, per token, next to the model's: prints figures (not a timed test).

Wall-clock ratios (bench_tracing.py) swing with a noisy host; CPU time per thread swings much
less, and the ratio of two CPU times taken in the same run hardly at all. Per round, in rotating
order: tracing off, the default sampling, full layer detail (every span to an OTLP JSON-lines
file). For each run it reads `time.thread_time()` on

- the model's thread, around `generate()` (with tracing on this includes the hot-path recorder);
- the telemetry thread, at each token listener call (the CPU it spent since the previous call is
  that token's timing, spans, statistics and hand-off to the exporters);
- the exporter thread, around each `export()` (encoding and writing the file).

Prints medians over rounds, per generated token, and the telemetry's share of the model thread's
CPU. Half the layers offloaded. `--batch N` generates N sequences per forward (one prompt
repeated), each its own generation: the figures are then per generated token, N per forward
(one step span per forward names its N sequences and links to their N generations).

    python bench/bench_telemetry_cpu.py --rounds 9 --tokens 48 [--batch 8]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracedoffload import OffloadConfig, offload
from tracedoffload.generation import encode_prompt, generate_once
from tracedoffload.tracing.exporters.jsonl import OtlpJsonLinesExporter
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import TracingSession

from _model import add_model_argument, load_bench_model

PROMPT = "Offloading traces."
POLICIES = {"off": None, "default": SamplingPolicy(), "full": SamplingPolicy.full_detail()}


class CpuTimedExporter(SpanExporter):
    """Adds up the exporting thread's CPU time spent in the wrapped exporter's `export`."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.cpu_s = 0.0
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        started = time.thread_time()
        try:
            return self.inner.export(spans)
        finally:
            with self._lock:
                self.cpu_s += time.thread_time() - started

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


class TelemetryCpu:
    """A step listener: the telemetry thread's CPU time between consecutive steps."""

    def __init__(self) -> None:
        self.cpu_s = 0.0
        self._last: float | None = None

    def __call__(self, timing: object, stats: object) -> None:
        now = time.thread_time()
        if self._last is not None:  # the first step's share includes thread start-up: left out
            self.cpu_s += now - self._last
        self._last = now


def generate_batch(model, tokenizer, prompt: str, tokens: int, batch: int, session: TracingSession | None) -> None:
    """`batch` copies of the prompt, `tokens` new tokens each, greedy, traced as `batch` generations."""
    encoded = encode_prompt(tokenizer, prompt)
    ids, mask = encoded["input_ids"].repeat(batch, 1), encoded["attention_mask"].repeat(batch, 1)
    traced = session.generations("default", [ids.shape[1]] * batch, tokens) if session is not None else contextlib.nullcontext()
    with torch.inference_mode(), traced:
        model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, eos_token_id=None, do_sample=False, pad_token_id=0)


def one_run(model, tokenizer, offloader, prompt, tokens: int, policy: SamplingPolicy | None, trace_dir: Path, batch: int = 1) -> dict[str, float]:
    """CPU ms per generated token of the model's thread, the telemetry thread and the exporter thread."""
    session = exporter = telemetry = None
    if policy is not None:
        exporter = CpuTimedExporter(OtlpJsonLinesExporter(trace_dir / f"{time.time_ns()}.otlp.jsonl"))
        telemetry = TelemetryCpu()
        session = TracingSession([exporter], policy=policy)
        session.add_step_listener(telemetry)
        session.attach(offloader)
    started = time.thread_time()
    if batch == 1:
        generate_once(model, tokenizer, prompt, tokens, session, "default", ignore_eos=True)
    else:
        generate_batch(model, tokenizer, prompt, tokens, batch, session)
    model_cpu = time.thread_time() - started
    if session is not None:
        session.shutdown(30)  # every export done before the exporter's CPU time is read
    per_token = 1e3 / (tokens * batch)
    return {
        "model": model_cpu * per_token,
        # The telemetry thread's CPU is read at each listener call: the first step's is not in it.
        "telemetry": telemetry.cpu_s * 1e3 / ((tokens - 1) * batch) if telemetry else 0.0,
        "export": exporter.cpu_s * per_token if exporter else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=1, help="sequences per forward (default 1)")
    add_model_argument(parser)
    args = parser.parse_args()

    loaded = load_bench_model(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    offloader = offload(model, OffloadConfig(num_layers_on_gpu=len(model.model.layers) // 2, device="cpu"))
    prompt = PROMPT
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in POLICIES}
    with tempfile.TemporaryDirectory() as trace_dir:
        one_run(model, tokenizer, offloader, prompt, 8, None, Path(trace_dir))  # warm-up
        order = list(POLICIES)
        for round_index in range(args.rounds):
            for name in order[round_index % 3 :] + order[: round_index % 3]:
                runs[name].append(one_run(model, tokenizer, offloader, prompt, args.tokens, POLICIES[name], Path(trace_dir), args.batch))
    offloader.detach()

    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    print(f"CPU time per generated token, medians of {args.rounds} interleaved rounds x {args.tokens} tokens x batch {args.batch}, half the layers offloaded")
    print(f"  {'':8} {'model thread':>13} {'telemetry':>10} {'export':>9}")
    for name in POLICIES:
        print(f"  {name:<8} {median(name, 'model'):10.3f} ms {median(name, 'telemetry') * 1e3:7.0f} us {median(name, 'export') * 1e3:6.0f} us")
    for name in ("default", "full"):
        # Per round: the run's telemetry CPU over the untraced run's model CPU of the same round.
        share = statistics.median(
            (run["telemetry"] + run["export"]) / off["model"] for run, off in zip(runs[name], runs["off"], strict=True)
        )
        hot_path = statistics.median(run["model"] / off["model"] for run, off in zip(runs[name], runs["off"], strict=True))
        print(f"{name:<7}: telemetry + export CPU / model CPU = {share:.4f};  model thread CPU traced / off = {hot_path:.4f}")


if __name__ == "__main__":
    main()
