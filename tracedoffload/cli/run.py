"""`tracedoffload run`: one offloaded generation with a summary of what moved and how long it took.

    tracedoffload run --preset aggressive --max-new-tokens 32
    tracedoffload run --num-gpu-layers 14 --prefetch 2 --json
    tracedoffload run --no-offload            # every layer resident, for comparison
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from typing import Any, NamedTuple

import torch

from tracedoffload import planner
from tracedoffload._exceptions import ConfigError, TracedOffloadError
from tracedoffload._summary import format_summary, placement_figures, run_summary
from tracedoffload.config import PRESETS, OffloadConfig
from tracedoffload.default_model import load_model
from tracedoffload.layers import find_decoder_layers
from tracedoffload.logs import configure_logging
from tracedoffload.offloader import offload, resolve_device
from tracedoffload.cli import _telemetry
from tracedoffload.tracing.session import TracingSession

DEFAULT_PROMPT = "Offloading moves the weights of a layer onto the device just before it runs."
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Generation(NamedTuple):
    """One generation's counts, wall time and decoded new text."""

    prompt_tokens: int
    generated_tokens: int
    seconds: float
    text: str


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `run` subcommand."""
    parser = subparsers.add_parser(
        "run",
        help="generate once with some decoder layers offloaded and print a summary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", metavar="PATH", help="a local model directory (save_pretrained); default: the embedded 28-layer model")
    layers = parser.add_mutually_exclusive_group()
    tiers = sorted(getattr(planner, "GPU_TIERS", {}))
    layers.add_argument("--preset", metavar="NAME", help=f"resident layers by preset: {', '.join([*PRESETS, *tiers])} (default balanced)")
    layers.add_argument("--num-gpu-layers", type=int, metavar="N", help="decoder layers kept resident on the device")
    layers.add_argument("--no-offload", action="store_true", help="keep every layer resident (no offloader) for comparison")
    # None means "not given": a GPU tier's own settings are only overridden by flags the user passed.
    parser.add_argument("--residency", help="which layers stay resident: interleaved, first or last")
    parser.add_argument("--prefetch", type=int, help="offloaded layers copied ahead of need (0 to 8, default 1)")
    parser.add_argument("--no-pin-memory", dest="pin_memory", action="store_false", default=None, help="do not pin the host copies (CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: float32 for the embedded model, as saved for --model)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate; always all of them (default 64)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt text")
    parser.add_argument("--seed", type=int, default=0, help="seed of the embedded model's weights (default 0)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    _telemetry.add_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load, offload, generate once, detach, print the summary.

    Raises:
        TracedOffloadError: bad flags (ConfigError names the field), a missing device or model.
    """
    if args.max_new_tokens < 1:
        raise ConfigError("max_new_tokens", args.max_new_tokens, "an integer >= 1")
    # Log lines go to stderr so that stdout carries only the summary (parseable with --json).
    configure_logging(args.log_format, args.log_level, stream=_CurrentStderr())
    dtype = DTYPES[args.dtype] if args.dtype else None
    # Validate everything that needs no model before loading one: bad flags fail fast.
    config = None if args.no_offload else _config_from_flags(args, dtype)
    policy = _telemetry.check_arguments(args)
    device = resolve_device(args.device)
    model, tokenizer, name = load_model(args.model, dtype, seed=args.seed)
    if config is None:
        model.to(device)
        generation = generate_once(model, tokenizer, args.prompt, args.max_new_tokens)
        summary = run_summary(name, placement_figures(None, len(find_decoder_layers(model)[1]), device), generation, None)
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
        return 0
    offloader = offload(model, config)
    telemetry = _telemetry.start(args, policy, offloader, name, planner.kv_bytes_per_token(model.config, _weights_dtype(model)))
    try:
        placement = placement_figures(offloader, len(offloader.layers), offloader.device)
        generation = generate_once(model, tokenizer, args.prompt, args.max_new_tokens, telemetry.session, name)
    finally:
        telemetry.finish()
        offloader.detach()
    summary = run_summary(name, placement, generation, telemetry.stats)
    summary["trace_file"] = str(telemetry.trace_file) if telemetry.trace_file else None
    summary["perfetto_file"] = str(telemetry.perfetto) if telemetry.perfetto else None
    summary["leak_alerts"] = [dataclasses.asdict(alert) for alert in telemetry.monitor.alerts] if telemetry.monitor else []
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary), flush=True)
    telemetry.linger_and_close(args.metrics_linger)
    return 0


def generate_once(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    session: TracingSession | None = None,
    model_name: str = "",
) -> Generation:
    """Greedy-generate exactly `max_new_tokens` tokens after `prompt`, timed; traced as one
    generation when a tracing `session` is given.

    End-of-sequence never stops it: a randomly initialised model emits eos at random, and a
    benchmark needs the same token count every time.

    Blocking: waits for the device before stopping the clock.

    Raises:
        TracedOffloadError: the prompt encodes to no tokens (the model would fail on an empty input).
    """
    device = model.get_input_embeddings().weight.device
    encoded = tokenizer(prompt, return_tensors="pt")
    if encoded["input_ids"].shape[-1] == 0:
        raise TracedOffloadError(f"prompt={prompt!r} encodes to no tokens with {type(tokenizer).__name__}; give a non-empty prompt")
    input_ids = encoded["input_ids"].to(device)
    attention_mask = encoded["attention_mask"].to(device)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    _synchronize(device)
    traced = session.generation(model_name, input_ids.shape[1], max_new_tokens) if session is not None else contextlib.nullcontext()
    started = time.perf_counter()
    with torch.inference_mode(), traced as handle:
        output = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            # eos_token_id=None overrides the model's generation config; min_new_tokens also masks
            # eos should a generation config put it back.
            min_new_tokens=max_new_tokens,
            eos_token_id=None,
            do_sample=False,
            pad_token_id=pad,
        )
        if handle is not None:
            handle.output_tokens = output.shape[1] - input_ids.shape[1]
    _synchronize(device)
    seconds = time.perf_counter() - started
    new_tokens = output[0, input_ids.shape[1] :]
    return Generation(input_ids.shape[1], new_tokens.numel(), seconds, tokenizer.decode(new_tokens, skip_special_tokens=True))


def _config_from_flags(args: argparse.Namespace, dtype: torch.dtype | None) -> OffloadConfig:
    given = {
        "pin_memory": args.pin_memory,
        "prefetch": args.prefetch,
        "residency": args.residency,
    }
    fields = {key: value for key, value in given.items() if value is not None}
    return OffloadConfig(num_layers_on_gpu=args.num_gpu_layers, preset=args.preset, device=args.device, dtype=dtype, **fields)


def _weights_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time (a test harness swaps it per test)."""

    def write(self, text: str) -> int:
        _telemetry.end_progress_line()  # a log line never starts after the progress bar
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
