"""The `tracedoffload` command: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tracedoffload._exceptions import TracedOffloadError


def build_parser() -> argparse.ArgumentParser:
    from tracedoffload.cli import plan, report, run

    parser = argparse.ArgumentParser(prog="tracedoffload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (run, plan, report):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except TracedOffloadError as error:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"tracedoffload {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
