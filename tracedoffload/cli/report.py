"""`tracedoffload report FILE`: the statistics recomputed from an exported trace file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tracedoffload._exceptions import TracedOffloadError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="recompute the offload statistics from an exported OTLP JSON-lines trace file",
        description="Recompute the statistics of a run from its OTLP JSON-lines trace file and list the slowest steps (forward passes) with their trace ids.",
    )
    parser.add_argument("file", type=Path, help="an OTLP JSON-lines file written by `tracedoffload run --trace-file`")
    parser.add_argument("--slowest", type=int, default=10, help="how many slow steps to list (default 10)")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    parser.add_argument(
        "--html",
        type=Path,
        metavar="OUT",
        help="also write an HTML report to OUT: step latency, per-layer heatmaps, copy and compute streams, memory (needs plotly: pip install 'tracedoffload[report]')",
    )
    parser.set_defaults(handler=report)


def report(args: argparse.Namespace) -> int:
    if args.file.is_dir():
        raise TracedOffloadError(f"file={str(args.file)!r} is a directory: give the .otlp.jsonl file written by `tracedoffload run`")
    if not args.file.is_file():
        raise TracedOffloadError(f"file={str(args.file)!r}: no such file")
    if args.slowest < 0:
        raise TracedOffloadError(f"--slowest={args.slowest}: must be >= 0")
    if args.html is not None:
        # Checked before the file is read: a typo in the output path costs nothing.
        from tracedoffload.report.dependency import require_plotly
        from tracedoffload.report.output import check_html_path

        check_html_path(args.html)
        require_plotly()
    # Imported once the arguments are checked: --help and a bad argument need no SDK.
    from tracedoffload.tracing.exporters.jsonl import read_otlp_jsonl
    from tracedoffload.tracing.stats import SLOWEST_KEPT, stats_from_spans
    from tracedoffload.tracing.summary import slowest_steps, stats_table

    slowest_kept = max(args.slowest, SLOWEST_KEPT)
    digest = None
    try:
        if args.html is None:
            stats = stats_from_spans(read_otlp_jsonl(args.file), slowest_kept=slowest_kept)
        else:
            from tracedoffload.report.digest import TraceDigest

            # One pass gathers the charts' figures and the same statistics (the same OffloadStats).
            digest = TraceDigest(slowest_kept).add_all(read_otlp_jsonl(args.file))
            stats = digest.statistics()
    except (ValueError, KeyError, TypeError, ArithmeticError) as error:
        raise TracedOffloadError(f"file={str(args.file)!r} is not an OTLP JSON-lines trace file: {error}") from None
    if not stats["steps"]:
        raise TracedOffloadError(
            f"file={str(args.file)!r} holds no step spans: the statistics need a trace written at --trace-level token or layer"
        )
    if digest is not None:
        from tracedoffload.report.page import write_report

        size = write_report(args.html, digest, str(args.file), args.slowest)
        print(f"tracedoffload report: wrote {args.html} ({size / 1e6:.1f} MB)", file=sys.stderr)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(stats_table(stats))
        print(slowest_steps(stats, args.slowest))
    return 0
