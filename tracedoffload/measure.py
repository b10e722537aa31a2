"""What the machine it runs on does, for the planner: the host-to-device copy rate and the
resident compute time per token, measured instead of assumed (`tracedoffload plan --measure`).

On a CUDA device the copy is from pinned host memory to the device on a side stream, timed by
CUDA events, as the offloader copies. On the CPU the "device" is host memory too: the copy is a
memcpy into another buffer, which is exactly what the offloader's CPU mirror does per layer.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, NamedTuple

import torch

COPY_BYTES = 256 << 20  # large enough that a copy runs at its streaming rate
COPY_REPEATS = 5
DECODE_TOKENS = 16


class Measured(NamedTuple):
    device: str
    copy_gbps: float
    compute_ms_per_token: float


def copy_gbps(device: torch.device, nbytes: int = COPY_BYTES, repeats: int = COPY_REPEATS) -> float:
    """Median host-to-device copy rate in GB/s (1e9 bytes/s) over `repeats` copies of `nbytes`."""
    pinned = device.type == "cuda"
    source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).fill_(1)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target.copy_(source)  # first touch: page faults and allocator warm-up are not the rate
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source, non_blocking=True)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            started = time.perf_counter()
            target.copy_(source)
            seconds = time.perf_counter() - started
        rates.append(nbytes / seconds / 1e9)
    return statistics.median(rates)


def compute_ms_per_token(model: torch.nn.Module, tokenizer: Any, device: torch.device, tokens: int = DECODE_TOKENS) -> float:
    """Resident decode ms per token (every layer on `device`, prefill excluded), greedy."""
    from tracedoffload.generation import generate_once

    model.to(device)
    try:
        prompt = "Measure the time of one decode step."
        generate_once(model, tokenizer, prompt, 2, ignore_eos=True)  # warm-up
        short = generate_once(model, tokenizer, prompt, 1, ignore_eos=True)
        long = generate_once(model, tokenizer, prompt, tokens + 1, ignore_eos=True)
    finally:
        model.to("cpu")
    # The difference of a 1-token and an (n+1)-token generation is n decode steps: no prefill in it.
    return 1e3 * max(long.seconds - short.seconds, 1e-9) / tokens


def measure(model: torch.nn.Module, tokenizer: Any, device: torch.device) -> Measured:
    return Measured(str(device), copy_gbps(device), compute_ms_per_token(model, tokenizer, device))
