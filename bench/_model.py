"""The model a benchmark runs: the default (SmolLM2-135M-Instruct, from its cached conversion)
unless --model names another ('random' for the random 28-layer model, a .gguf file, a directory).

Benchmarks generate a fixed number of tokens (`ignore_eos=True`): a figure per token needs the
same count in every run, wherever the model would have stopped.
"""

from __future__ import annotations

import argparse
import sys

from tracedoffload.models import LoadedModel, load_model


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a .gguf file, a model directory or 'random' (default: SmolLM2-135M-Instruct)")


def load_bench_model(args: argparse.Namespace) -> LoadedModel:
    """Load `args.model`, saying on stderr which model and from where (a first run converts the GGUF)."""
    loaded = load_model(args.model, notify=lambda message: print(message, file=sys.stderr, flush=True))
    print(f"model: {loaded.name} ({loaded.source}), {len(loaded.model.model.layers)} decoder layers", flush=True)
    return loaded
