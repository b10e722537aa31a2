"""The telemetry flags of `tracedoffload run`: defined, and checked before any model loads.

Defining them imports nothing heavy (no torch, transformers or OpenTelemetry SDK), so `--help`
and argument errors answer at once; checking them imports what the checks need.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

from tracedoffload._exceptions import ConfigError
from tracedoffload.faults import LEAK_KINDS
from tracedoffload.logs import LOG_FORMATS, LOG_LEVELS
from tracedoffload.tracing.otel_env import PROTOCOLS, read_otel_environment
from tracedoffload.tracing.sampling import LEVELS, SamplingPolicy

DEFAULT_TRACE_DIR = Path("traces")
MAX_LINGER_S = 86_400


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tracing = parser.add_argument_group(
        "tracing", "one trace per step (forward pass), linked to its generations (standard OTEL_* variables and TRACEDOFFLOAD_* ones apply)"
    )
    tracing.add_argument("--trace-level", choices=LEVELS, default=None, help="what is exported: off, generation, token (step spans), layer (default: TRACEDOFFLOAD_TRACE_LEVEL, else layer: layer spans of the steps the tail rule picks)")
    tracing.add_argument("--full-detail", action="store_true", help="export every step's layer spans (no sampling)")
    tracing.add_argument("--first-tokens", type=int, default=SamplingPolicy.first_tokens, help="the first N steps of each generation always exported with layer detail (default %(default)s)")
    tracing.add_argument("--sample-every", type=int, default=SamplingPolicy.every_n, help="1 in N of the other steps exported with layer detail (default %(default)s)")
    tracing.add_argument("--slow-token-ms", type=float, default=None, help="steps slower than this always get layer detail")
    tracing.add_argument("--relative-p95", type=float, default=SamplingPolicy.relative_to_p95, help="steps slower than this times the running p95 get layer detail (default %(default)s)")
    tracing.add_argument("--trace-file", type=Path, default=None, help="OTLP JSON-lines trace file (default: TRACEDOFFLOAD_TRACE_FILE, else traces/run-<time>.otlp.jsonl)")
    tracing.add_argument("--no-trace-file", action="store_true", help="write no trace file")
    tracing.add_argument("--append", action="store_true", help="add to an existing --trace-file (without it, an existing file is refused)")
    tracing.add_argument("--otlp-endpoint", default=None, help="export over OTLP to this collector (default: OTEL_EXPORTER_OTLP_ENDPOINT when set)")
    tracing.add_argument("--otlp-protocol", choices=PROTOCOLS, default=None, help="grpc or http/protobuf (default: OTEL_EXPORTER_OTLP_PROTOCOL, else grpc)")
    tracing.add_argument("--perfetto", type=Path, default=None, help="also write a Chrome/Perfetto trace JSON (open in ui.perfetto.dev)")
    tracing.add_argument(
        "--export-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="the most the end of a run waits for its traces and metrics to be sent, all exporters together (default: TRACEDOFFLOAD_EXPORT_BUDGET, else 5)",
    )
    tracing.add_argument("--trace-per-generation", action="store_true", help="one trace per generation instead of one per step (short runs)")
    tracing.add_argument("--profile-every", type=int, default=None, help="print a profiling summary every N steps (forward passes; one per token at batch 1)")
    tracing.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar on stderr (default: when stderr is a terminal)")
    tracing.add_argument("--log-format", choices=LOG_FORMATS, default="console", help="log lines as console text or JSON (default console)")
    tracing.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    memory = parser.add_argument_group("memory and metrics")
    memory.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (0: any free port; default: TRACEDOFFLOAD_METRICS_PORT, else none)")
    memory.add_argument("--metrics-addr", default=None, help="address of the metrics endpoint (default: TRACEDOFFLOAD_METRICS_ADDR, else 127.0.0.1)")
    memory.add_argument("--metrics-linger", type=float, default=0.0, help="keep serving metrics this many seconds after the run (for a final scrape)")
    memory.add_argument("--inject-leak", choices=LEAK_KINDS, default=None, help="fault injection: leak host memory per transfer (seed 003) or a device tensor per step")


def check_arguments(args: argparse.Namespace, *, default_trace_file: bool = True) -> Any:
    """Validate every telemetry flag and OTEL_* variable before any model work; returns the
    `TelemetrySettings` (each setting from its flag, else its environment variable, else the
    default). A bad value is a `ConfigError` naming the flag.

    Args:
        default_trace_file: with neither --trace-file nor TRACEDOFFLOAD_TRACE_FILE, write
            traces/run-<time>.otlp.jsonl (`run`); False: no file (`serve`, which runs for days).
    """
    from tracedoffload.telemetry import ENVIRONMENT, TelemetrySettings

    otel = read_otel_environment()
    if args.profile_every is not None and args.profile_every < 1:
        raise ConfigError("profile_every", args.profile_every, "an integer >= 1")
    if not (math.isfinite(args.metrics_linger) and 0 <= args.metrics_linger <= MAX_LINGER_S):
        raise ConfigError("metrics_linger", args.metrics_linger, f"seconds between 0 and {MAX_LINGER_S}")
    trace_file = args.trace_file
    if args.no_trace_file:
        trace_file = None
    elif default_trace_file and trace_file is None and not os.environ.get(ENVIRONMENT["trace_file"], "").strip() and not otel.sdk_disabled:
        # run's own default (the library's is no file); OTEL_SDK_DISABLED: no default file either.
        trace_file = DEFAULT_TRACE_DIR / f"run-{time.strftime('%Y%m%d-%H%M%S')}.otlp.jsonl"
    try:
        sampling = _sampling_policy(args)
        settings = TelemetrySettings.resolve(
            trace_level=args.trace_level,
            sampling=sampling,
            trace_file=trace_file,
            append=args.append,
            otlp_endpoint=args.otlp_endpoint,
            otlp_protocol=args.otlp_protocol,
            perfetto=args.perfetto,
            per_step_traces=not args.trace_per_generation,
            metrics_port=args.metrics_port,
            metrics_addr=args.metrics_addr,
            inject_leak=args.inject_leak,
            export_budget_s=args.export_budget,
            quiet_sdk_logs=args.log_level != "debug",
        )
    except ConfigError as error:
        # The settings name their own fields; the user typed flags.
        raise ConfigError(_FLAGS.get(error.field, error.field), error.value, error.valid) from None
    if args.no_trace_file and settings.trace_file is not None:
        settings = dataclasses.replace(settings, trace_file=None)
    return settings


def _sampling_policy(args: argparse.Namespace) -> SamplingPolicy:
    level = args.trace_level or "layer"  # the settings put the environment's level in, when given
    if args.full_detail:
        return SamplingPolicy(level=level, every_n=1)
    return SamplingPolicy(
        level=level,
        first_tokens=args.first_tokens,
        every_n=args.sample_every,
        slow_token_ms=args.slow_token_ms,
        relative_to_p95=args.relative_p95,
    )


_FLAGS = {
    "every_n": "--sample-every",
    "first_tokens": "--first-tokens",
    "slow_token_ms": "--slow-token-ms",
    "relative_to_p95": "--relative-p95",
    "export_budget_s": "export_budget",
}
