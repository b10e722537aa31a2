"""Tracing overhead on the default model: prints figures (not a timed test).

Half the layers offloaded; per round, in rotating order: tracing off, the default sampling, and
full layer detail (every span exported to an OTLP JSON-lines file). Token latency is the median
of the per-round ms/token. Targets: full / off <= 1.03, default / off <= 1.01.

Telemetry and export run behind the generation (the telemetry thread rests up to 0.25 s between
batches, the batch processors up to 0.5 s), so on a short run part of their work lands after the
last token. The bench prints the ratios twice: over the generation alone, and over the
generation plus the flush that finishes its telemetry (an upper bound: as if none of that work
had overlapped the model).

    python bench/bench_tracing.py --rounds 15 --tokens 48
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tracedoffload import OffloadConfig, offload
from tracedoffload.generation import generate_once
from tracedoffload.tracing.exporters.jsonl import OtlpJsonLinesExporter
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import TracingSession

from _model import add_model_argument, load_bench_model

PROMPT = "Offloading traces."
POLICIES = {"off": None, "default": SamplingPolicy(), "full": SamplingPolicy.full_detail()}


def ms_per_token(model, tokenizer, offloader, prompt, tokens: int, policy: SamplingPolicy | None, trace_dir: Path) -> tuple[float, float, dict]:
    """ms/token of the generation, and of the generation plus flushing its telemetry."""
    session = None
    if policy is not None:
        session = TracingSession([OtlpJsonLinesExporter(trace_dir / f"{time.time_ns()}.otlp.jsonl")], policy=policy)
        session.attach(offloader)
    generation = generate_once(model, tokenizer, prompt, tokens, session, "default", ignore_eos=True)
    flush_s = 0.0
    stats = {}
    if session is not None:
        started = time.perf_counter()
        session.flush(30)
        flush_s = time.perf_counter() - started
        session.shutdown(30)
        stats = session.snapshot()
    per_token = 1e3 / generation.generated_tokens
    return generation.seconds * per_token, (generation.seconds + flush_s) * per_token, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--device", default="auto")
    add_model_argument(parser)
    args = parser.parse_args()

    loaded = load_bench_model(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    offloader = offload(model, OffloadConfig(num_layers_on_gpu=len(model.model.layers) // 2, device=args.device))
    prompt = PROMPT
    results: dict[str, list[float]] = {name: [] for name in POLICIES}
    flushed: dict[str, list[float]] = {name: [] for name in POLICIES}
    spans_exported = {}
    with tempfile.TemporaryDirectory() as trace_dir:
        ms_per_token(model, tokenizer, offloader, prompt, 8, None, Path(trace_dir))  # warm-up
        order = list(POLICIES)
        for round_index in range(args.rounds):
            for name in order[round_index % 3 :] + order[: round_index % 3]:
                elapsed, with_flush, stats = ms_per_token(model, tokenizer, offloader, prompt, args.tokens, POLICIES[name], Path(trace_dir))
                results[name].append(elapsed)
                flushed[name].append(with_flush)
                if stats:
                    spans_exported[name] = stats.get("layer_detail_steps"), stats.get("dropped_spans")
    offloader.detach()

    median = {name: statistics.median(values) for name, values in results.items()}
    print(f"device {offloader.device}, {args.rounds} interleaved rounds x {args.tokens} tokens, half the layers offloaded")
    for name, value in median.items():
        spread = f"min {min(results[name]):.2f} max {max(results[name]):.2f}"
        detail = f"  (steps with layer detail, dropped spans in last run: {spans_exported[name]})" if name in spans_exported else ""
        print(f"  {name:<8} median {value:7.2f} ms/token  {spread}{detail}")
    # Paired ratios: the three runs of a round are back to back and share the machine's phase, so
    # their ratio is less exposed to a noisy neighbour than the ratio of two medians.
    for label, series in (("generation", results), ("generation + flush", flushed)):
        print(f"over the {label}:")
        for name, target in (("full", 1.03), ("default", 1.01)):
            ratio_of_medians = statistics.median(series[name]) / statistics.median(series["off"])
            paired = statistics.median(r / o for r, o in zip(series[name], series["off"], strict=True))
            print(f"  {name:<7} / off = {ratio_of_medians:.4f} (ratio of medians), {paired:.4f} (median of per-round ratios)   target <= {target}")


if __name__ == "__main__":
    main()
