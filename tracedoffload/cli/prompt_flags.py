"""The flags that say what to ask the model, shared by `run` and `verify`."""

from __future__ import annotations

import argparse

DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the prompt text (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--system", metavar="TEXT", help="a system message before the prompt (models with a chat template)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the tokenizer's chat template")
