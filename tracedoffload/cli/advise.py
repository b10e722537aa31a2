"""`tracedoffload advise FILE`: which residency to run, predicted from a run's own trace.

    tracedoffload run --trace-level token --trace-file run.otlp.jsonl
    tracedoffload advise run.otlp.jsonl
    tracedoffload advise run.otlp.jsonl --device-memory 512MiB
    tracedoffload advise run.otlp.jsonl --target-ms-per-token 45 --json

From the measured per-layer compute and copy times of the run, predicts the time per token and the
peak device memory of every resident layer count, residency policy, prefetch depth (and, for a
`serve` trace, batch size it ran), prints the best of them and recommends one, saying why. The
model and where it breaks: tracedoffload/advisor/model.py and the README.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from tracedoffload._checks import check_positive
from tracedoffload._exceptions import ConfigError, TracedOffloadError

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
DEVICE_MEMORY_FORMS = "bytes as an integer (8000000000) or a number with a unit: 512MiB, 8GiB, 8GB (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `advise` subcommand."""
    parser = subparsers.add_parser(
        "advise",
        help="predict time per token and device memory for other residencies from a run's trace, and recommend one",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", type=Path, help="an OTLP JSON-lines file written by `tracedoffload run --trace-file` (or `serve`) at --trace-level token or layer")
    parser.add_argument("--device-memory", metavar="SIZE", help="device memory to fit in, e.g. 8GiB, 512MiB or 8000000000 (bytes); candidates that need more are excluded")
    parser.add_argument("--target-ms-per-token", type=float, metavar="MS", help="recommend the least device memory that meets this time per token")
    parser.add_argument("--json", action="store_true", help="print the advice as JSON")
    parser.set_defaults(handler=advise)


def parse_device_memory(text: str) -> int:
    """Bytes from `text` (an integer, or a number with a binary or decimal unit).

    Raises:
        ConfigError: naming `device_memory` and the valid forms.
    """
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError("device_memory", text, DEVICE_MEMORY_FORMS)
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError("device_memory", text, f"more than 0 bytes: {DEVICE_MEMORY_FORMS}")
    return size


def advise(args: argparse.Namespace) -> int:
    """Read the trace, weigh the candidates, print the advice.

    Raises:
        TracedOffloadError: a missing or unreadable file, a trace the advice cannot use, or a bad
            flag (ConfigError names it).
    """
    device_memory = parse_device_memory(args.device_memory) if args.device_memory is not None else None
    if args.target_ms_per_token is not None:
        check_positive("target_ms_per_token", args.target_ms_per_token, "milliseconds per token, a finite number > 0")
    if args.file.is_dir():
        raise TracedOffloadError(f"file={str(args.file)!r} is a directory: give the .otlp.jsonl file written by `tracedoffload run --trace-file`")
    if not args.file.is_file():
        raise TracedOffloadError(f"file={str(args.file)!r}: no such file")
    # Imported once the arguments are checked: --help and a bad argument need no SDK.
    from tracedoffload.advisor.measured import TraceError, measured_run
    from tracedoffload.advisor.recommend import advise as weigh
    from tracedoffload.advisor.render import advice_data, advice_text
    from tracedoffload.tracing.exporters.jsonl import read_otlp_jsonl

    try:
        run = measured_run(read_otlp_jsonl(args.file))
    except TraceError as error:
        raise TracedOffloadError(f"file={str(args.file)!r} {error}") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise TracedOffloadError(f"file={str(args.file)!r} is not an OTLP JSON-lines trace file: {error}") from None
    advice = weigh(run, device_memory, args.target_ms_per_token)
    if args.json:
        print(json.dumps(advice_data(str(args.file), run, advice), indent=2))
    else:
        print(advice_text(str(args.file), run, advice))
    return 0
