"""The `tracedoffload` command: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from tracedoffload._exceptions import TracedOffloadError


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument answered in one line (argparse prints the whole usage first,
    which for `run` is a screenful above the one line that matters)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from tracedoffload.cli import advise, plan, report, run, serve, verify

    parser = _Parser(prog="tracedoffload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (run, serve, plan, report, advise, verify):
        module.add_parser(sub)
    return parser


EXIT_USAGE = 2  # bad input, as argparse exits for a bad flag
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and run one subcommand. Only argparse's own imports happen before the arguments are
    parsed: each subcommand imports torch, transformers and the SDK when it runs."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except TracedOffloadError as error:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"tracedoffload {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Ctrl-C outside a generation (loading, converting: the cache is written atomically, so
        # nothing is left half done); a generation stops itself and reports what it made.
        print(f"\ntracedoffload {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
