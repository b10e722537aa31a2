"""The telemetry flags of `tracedoffload run`: defined, and checked before any model loads.

Defining them imports nothing heavy (no torch, transformers or OpenTelemetry SDK), so `--help`
and argument errors answer at once; checking them imports what the checks need.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from tracedoffload._exceptions import ConfigError
from tracedoffload.faults import LEAK_KINDS
from tracedoffload.logs import LOG_FORMATS, LOG_LEVELS
from tracedoffload.tracing.otel_env import PROTOCOLS, read_otel_environment
from tracedoffload.tracing.sampling import LEVELS, SamplingPolicy

DEFAULT_TRACE_DIR = Path("traces")
MAX_LINGER_S = 86_400
DEFAULT_EXPORT_BUDGET_S = 5.0
MAX_EXPORT_BUDGET_S = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tracing = parser.add_argument_group("tracing", "one trace per token, linked to its generation (standard OTEL_* variables apply)")
    tracing.add_argument("--trace-level", choices=LEVELS, default="layer", help="what is exported: off, generation, token, layer (default layer: layer spans of the tokens the tail rule picks)")
    tracing.add_argument("--full-detail", action="store_true", help="export every token's layer spans (no sampling)")
    tracing.add_argument("--first-tokens", type=int, default=SamplingPolicy.first_tokens, help="tokens of each generation always exported with layer detail (default %(default)s)")
    tracing.add_argument("--sample-every", type=int, default=SamplingPolicy.every_n, help="1 in N of the other tokens exported with layer detail (default %(default)s)")
    tracing.add_argument("--slow-token-ms", type=float, default=None, help="tokens slower than this always get layer detail")
    tracing.add_argument("--relative-p95", type=float, default=SamplingPolicy.relative_to_p95, help="tokens slower than this times the running p95 get layer detail (default %(default)s)")
    tracing.add_argument("--trace-file", type=Path, default=None, help="OTLP JSON-lines trace file (default traces/run-<time>.otlp.jsonl)")
    tracing.add_argument("--no-trace-file", action="store_true", help="write no trace file")
    tracing.add_argument("--append", action="store_true", help="add to an existing --trace-file (without it, an existing file is refused)")
    tracing.add_argument("--otlp-endpoint", default=None, help="export over OTLP to this collector (default: OTEL_EXPORTER_OTLP_ENDPOINT when set)")
    tracing.add_argument("--otlp-protocol", choices=PROTOCOLS, default=None, help="grpc or http/protobuf (default: OTEL_EXPORTER_OTLP_PROTOCOL, else grpc)")
    tracing.add_argument("--perfetto", type=Path, default=None, help="also write a Chrome/Perfetto trace JSON (open in ui.perfetto.dev)")
    tracing.add_argument(
        "--export-budget",
        type=float,
        default=DEFAULT_EXPORT_BUDGET_S,
        metavar="SECONDS",
        help="the most the end of a run waits for its traces and metrics to be sent, all exporters together (default %(default)s)",
    )
    tracing.add_argument("--trace-per-generation", action="store_true", help="one trace per generation instead of one per token (short runs)")
    tracing.add_argument("--profile-every", type=int, default=None, help="print a profiling summary every N steps (forward passes; one per token at batch 1)")
    tracing.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar on stderr (default: when stderr is a terminal)")
    tracing.add_argument("--log-format", choices=LOG_FORMATS, default="console", help="log lines as console text or JSON (default console)")
    tracing.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    memory = parser.add_argument_group("memory and metrics")
    memory.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (0: any free port)")
    memory.add_argument("--metrics-addr", default="127.0.0.1", help="address of the metrics endpoint (default 127.0.0.1)")
    memory.add_argument("--metrics-linger", type=float, default=0.0, help="keep serving metrics this many seconds after the run (for a final scrape)")
    memory.add_argument("--inject-leak", choices=LEAK_KINDS, default=None, help="fault injection: leak host memory per transfer (seed 003) or a device tensor per token")


def check_arguments(args: argparse.Namespace) -> SamplingPolicy:
    """Validate every telemetry flag and OTEL_* variable before any model work; returns the
    sampling policy. Sets `args.otel` (the checked environment), `args.otlp` (whether traces go
    over OTLP) and resolves `args.trace_file` (None for no file)."""
    args.otel = read_otel_environment()
    if args.profile_every is not None and args.profile_every < 1:
        raise ConfigError("profile_every", args.profile_every, "an integer >= 1")
    if not (math.isfinite(args.metrics_linger) and 0 <= args.metrics_linger <= MAX_LINGER_S):
        raise ConfigError("metrics_linger", args.metrics_linger, f"seconds between 0 and {MAX_LINGER_S}")
    if not (math.isfinite(args.export_budget) and 0 < args.export_budget <= MAX_EXPORT_BUDGET_S):
        raise ConfigError("export_budget", args.export_budget, f"seconds, more than 0 and at most {MAX_EXPORT_BUDGET_S:.0f}")
    if args.otlp_endpoint and args.otel.sdk_disabled:
        raise ConfigError("otlp_endpoint", args.otlp_endpoint, "not with OTEL_SDK_DISABLED=true (which means no telemetry leaves the process)")
    args.otlp = False
    if args.trace_level != "off":
        from tracedoffload.tracing.exporters.otlp import check_otlp_settings, otlp_requested

        args.otlp = bool(args.otlp_endpoint or otlp_requested())
        if args.otlp:
            check_otlp_settings(args.otlp_endpoint, args.otlp_protocol)
        _resolve_trace_file(args)
        if args.perfetto is not None:
            _check_output_path("perfetto", args.perfetto)
    else:
        args.trace_file = None
    if args.metrics_port is not None:
        from tracedoffload.metrics import check_port_free

        check_port_free(args.metrics_port, args.metrics_addr)
    if args.inject_leak and args.trace_level == "off":
        raise ConfigError("inject_leak", args.inject_leak, "used with tracing on: leaks are detected from the token readings (drop --trace-level off)")
    try:
        if args.full_detail:
            return SamplingPolicy(level=args.trace_level, every_n=1)
        return SamplingPolicy(
            level=args.trace_level,
            first_tokens=args.first_tokens,
            every_n=args.sample_every,
            slow_token_ms=args.slow_token_ms,
            relative_to_p95=args.relative_p95,
        )
    except ConfigError as error:
        # The policy names its own fields; the user typed flags.
        raise ConfigError(_SAMPLING_FLAGS.get(error.field, error.field), error.value, error.valid) from None


_SAMPLING_FLAGS = {"every_n": "--sample-every", "first_tokens": "--first-tokens", "slow_token_ms": "--slow-token-ms", "relative_to_p95": "--relative-p95"}


def _resolve_trace_file(args: argparse.Namespace) -> None:
    if args.no_trace_file or (args.trace_file is None and args.otel.sdk_disabled):
        args.trace_file = None  # OTEL_SDK_DISABLED: no default file either; an explicit one is written
        return
    if args.trace_file is None:
        # The default is resolved here, so it is checked like a given path.
        args.trace_file = DEFAULT_TRACE_DIR / f"run-{time.strftime('%Y%m%d-%H%M%S')}.otlp.jsonl"
    elif args.trace_file.is_file() and not args.append:
        # Two runs in one file read back as one run with two prefills: say so before it happens.
        raise ConfigError("trace_file", str(args.trace_file), "a new file (it exists: pass --append to add this run to it, or another path)")
    _check_output_path("trace_file", args.trace_file)


def _check_output_path(field: str, path: Path) -> None:
    """A file that can be written: not a directory, in a directory that exists (or can be made) and
    is writable. Checked before the model loads, so a typo does not cost a whole run."""
    if path.is_dir():
        raise ConfigError(field, str(path), "a file path (this is a directory)")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(field, str(path), f"a file in a directory that can be created ({error.strerror})") from None
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(field, str(path), "a writable file path")
