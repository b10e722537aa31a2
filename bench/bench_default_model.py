"""The default model (SmolLM2-135M-Instruct from its GGUF): load times and decode speed. Prints
figures (not a timed test).

Loads, each in its own process so that nothing is warm but the page cache, interleaved:
  first   an empty cache: read the GGUF, dequantize, save the entry, load it;
  cached  the entry the previous `first` wrote: verify it, load the safetensors.
The seconds are those of `load_model` inside the process (the interpreter and imports are the
same for both and are not counted). Goal: cached / first <= 0.25.

Decode, in this process, interleaved rounds of greedy generation of a fixed token count:
  resident            every layer resident, no offloader;
  balanced            the balanced preset (17 of 30 layers offloaded);
  resident, FTZ       resident with denormals flushed to zero (torch.set_flush_denormal), to
                      see whether denormal floats left by dequantization slow the CPU down.
Decode ms per token is read between the first and the last generated token (a logits processor
notes the time of each step), so the prompt's prefill is not in it.

    python bench/bench_default_model.py --load-rounds 3 --rounds 7 --tokens 48
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from tracedoffload import OffloadConfig, offload
from tracedoffload.generation import encode_prompt
from tracedoffload.logs import configure_logging
from tracedoffload.models import load_model

PROMPT = "Explain in three sentences why the sky is blue."
_LOAD_ONE = """
import json, sys, time
from pathlib import Path
from tracedoffload.models import load_model
started = time.perf_counter()
loaded = load_model(None, cache_dir=Path(sys.argv[1]))
print(json.dumps({"seconds": time.perf_counter() - started, "source": loaded.source}))
"""


class StepClock(LogitsProcessor):
    """Notes the time each generation step reaches the logits processors (one per new token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def load_seconds(cache_dir: Path) -> tuple[float, str]:
    done = subprocess.run([sys.executable, "-c", _LOAD_ONE, str(cache_dir)], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["seconds"], result["source"]


def decode_ms_per_token(model, inputs: dict, tokens: int) -> float:
    clock = StepClock()
    with torch.inference_mode():
        model.generate(
            **inputs, max_new_tokens=tokens, min_new_tokens=tokens, eos_token_id=None, do_sample=False,
            pad_token_id=0, logits_processor=LogitsProcessorList([clock]),
        )
    return 1e3 * (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)


def offloaded(model, inputs: dict, tokens: int) -> float:
    with offload(model, OffloadConfig(preset="balanced", device="cpu")):
        return decode_ms_per_token(model, inputs, tokens)


def flushing_denormals(model, inputs: dict, tokens: int) -> float:
    torch.set_flush_denormal(True)
    try:
        return decode_ms_per_token(model, inputs, tokens)
    finally:
        torch.set_flush_denormal(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-rounds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    configure_logging(level="warning")

    firsts, cacheds = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.load_rounds):
            cache_dir = Path(scratch) / f"cache-{round_index}"
            seconds, source = load_seconds(cache_dir)
            assert source == "gguf (converted)", source
            firsts.append(seconds)
            seconds, source = load_seconds(cache_dir)
            assert source == "gguf (cached)", source
            cacheds.append(seconds)
            print(f"  load round {round_index}: first {firsts[-1]:.2f} s, cached {cacheds[-1]:.2f} s", flush=True)
        loaded = load_model(None, cache_dir=cache_dir)  # the last round's entry
    first, cached = statistics.median(firsts), statistics.median(cacheds)
    print(f"load, medians of {args.load_rounds} rounds: first {first:.2f} s, cached {cached:.2f} s")
    print(f"  cached / first = {cached / first:.4f} (goal <= 0.25)")

    model = loaded.model
    weights = [p for p in model.parameters() if p.is_floating_point()]
    denormals = sum(int(((p != 0) & (p.abs() < torch.finfo(p.dtype).tiny)).sum()) for p in weights)
    print(f"model: {loaded.name}, {len(model.model.layers)} layers, {sum(p.numel() for p in weights):,} weights, "
          f"{denormals} denormal; torch threads {torch.get_num_threads()}")
    inputs = encode_prompt(loaded.tokenizer, PROMPT)
    runs = {
        "resident": lambda: decode_ms_per_token(model, inputs, args.tokens),
        "balanced": lambda: offloaded(model, inputs, args.tokens),
        "resident, FTZ": lambda: flushing_denormals(model, inputs, args.tokens),
    }
    for run in runs.values():  # warm-up
        run()
    results: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for round_index in range(args.rounds):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            results[name].append(runs[name]())

    print(f"decode ms per token, medians of {args.rounds} interleaved rounds x {args.tokens} tokens (min-max)")
    for name, values in results.items():
        print(f"  {name:<14} {statistics.median(values):7.2f}  ({min(values):.2f}-{max(values):.2f})")
    for name in ("balanced", "resident, FTZ"):
        paired = statistics.median(r / o for r, o in zip(results[name], results["resident"], strict=True))
        print(f"  {name:<14} / resident = {paired:.4f} (median of per-round ratios)")


if __name__ == "__main__":
    main()
