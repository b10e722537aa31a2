"""Offloading cost on the default model: prints figures (not a timed test).

Per round, in rotating order:
  (a) resident   every layer on the device, no offloader at all: ms per token;
  (b) offloaded  half the decoder layers offloaded (default residency and prefetch): ms per token;
  (c) copies     the raw copies of those layers' packed host buffers into a device buffer,
                 summed over the layers: ms per token (one sweep of every offloaded layer).
Medians over rounds. On the CPU a copy cannot overlap compute (one host thread does both), so
offloading should cost no more than the copies: (b) / ((a) + (c)) <= 1.05. On CUDA the copies
run on a side stream behind the compute: (b) / max((a), (c)) <= 1.15.

    python bench/bench_offload.py --rounds 7 --tokens 32 --device auto
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tracedoffload import OffloadConfig, RecordingTimeline, offload
from tracedoffload.generation import generate_once
from tracedoffload.logs import configure_logging
from tracedoffload.offloader import resolve_device
from tracedoffload.timeline import TRANSFER

from _model import add_model_argument, load_bench_model

PROMPT = "Offloading moves the weights of a layer onto the device just before it runs."


def resident_ms_per_token(model, tokenizer, device: torch.device, tokens: int) -> float:
    """(a): every layer on the device, no hooks."""
    model.to(device)
    try:
        generation = generate_once(model, tokenizer, PROMPT, tokens, ignore_eos=True)
    finally:
        model.to("cpu")  # the model's home between runs: offload() expects it there
    return 1e3 * generation.seconds / generation.generated_tokens


def offloaded_ms_per_token(model, tokenizer, config: OffloadConfig, tokens: int) -> tuple[float, float]:
    """(b): ms per token with half the layers offloaded, and the timeline's transfer ms per token."""
    timeline = RecordingTimeline()
    with offload(model, config, timeline=timeline):
        generation = generate_once(model, tokenizer, PROMPT, tokens, ignore_eos=True)
    # Read after detach (it synchronizes), so CUDA timing events have completed.
    transfer_ms = sum(_record_ms(r) for r in timeline.records(TRANSFER))
    return 1e3 * generation.seconds / generation.generated_tokens, transfer_ms / len(timeline.steps)


def _record_ms(record) -> float:
    """A record's duration: host-clock ns on the CPU path, CUDA events on the GPU path."""
    if isinstance(record.start, int):
        return (record.end - record.start) / 1e6
    return record.start.elapsed_time(record.end)


def copy_ms_per_token(model, config: OffloadConfig, tokens: int) -> float:
    """(c): one sweep copies every offloaded layer's packed host buffer into a device buffer.

    Destinations alternate over as many buffers as the offloader has slots, as its copies do.
    """
    with offload(model, config) as offloader:
        indices = offloader.offloaded_indices
        slot_bytes = max(offloader.layer_bytes(i) for i in indices)
        slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=offloader.device) for _ in range(offloader.num_slots)]
        sources = [(offloader.host_buffer(i), offloader.layer_bytes(i)) for i in indices]
        total_ms = 0.0
        for _ in range(tokens):
            total_ms += _sweep_ms(sources, slots, offloader)
    return total_ms / tokens


def _sweep_ms(sources, slots, offloader) -> float:
    if offloader.device.type == "cuda":
        stream = offloader.streams.copy_stream
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        with torch.cuda.stream(stream):
            for n, (host, nbytes) in enumerate(sources):
                slots[n % len(slots)][:nbytes].copy_(host, non_blocking=True)
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end)
    started = time.perf_counter_ns()
    for n, (host, nbytes) in enumerate(sources):
        slots[n % len(slots)][:nbytes].copy_(host)
    return (time.perf_counter_ns() - started) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    add_model_argument(parser)
    args = parser.parse_args()
    configure_logging(level="warning")  # one attach/detach line per run would bury the figures

    device = resolve_device(args.device)
    loaded = load_bench_model(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    num_layers = len(model.model.layers)
    config = OffloadConfig(num_layers_on_gpu=num_layers // 2, device=str(device))
    runs = {
        "a": lambda: resident_ms_per_token(model, tokenizer, device, args.tokens),
        "b": lambda: offloaded_ms_per_token(model, tokenizer, config, args.tokens),
        "c": lambda: copy_ms_per_token(model, config, args.tokens),
    }
    for name in runs:  # warm-up: kernels, allocator, page faults
        runs[name]()
    results: dict[str, list[float]] = {name: [] for name in [*runs, "timeline"]}
    order = list(runs)
    for round_index in range(args.rounds):
        for name in order[round_index % 3 :] + order[: round_index % 3]:
            value = runs[name]()
            if name == "b":
                value, transfer_ms = value
                results["timeline"].append(transfer_ms)
            results[name].append(value)

    median = {name: statistics.median(values) for name, values in results.items()}
    labels = {
        "a": "(a) resident ms/token",
        "b": "(b) offloaded ms/token",
        "c": "(c) raw copies ms/token",
        "timeline": "    timeline transfer ms/token in (b)",
    }
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, {args.rounds} interleaved rounds x {args.tokens} tokens, "
        f"{num_layers - config.num_layers_on_gpu} of {num_layers} layers offloaded"
    )
    for name, label in labels.items():
        print(f"  {label:<38} median {median[name]:8.3f}   min {min(results[name]):8.3f}  max {max(results[name]):8.3f}")
    print(f"(b) / ((a) + (c))   = {median['b'] / (median['a'] + median['c']):.4f}   (target <= 1.05 on CPU)")
    if device.type == "cuda":
        print(f"(b) / max((a), (c)) = {median['b'] / max(median['a'], median['c']):.4f}   (target <= 1.15 on CUDA)")


if __name__ == "__main__":
    main()
