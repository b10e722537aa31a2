"""`tracedoffload plan`: the VRAM table (GPU layers vs estimated VRAM vs expected slowdown), no weights loaded."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from tracedoffload._checks import check_choice, check_int, check_positive
from tracedoffload._exceptions import ConfigError
from tracedoffload.models import RANDOM_MODEL
from tracedoffload.models.gguf_file import is_gguf_path
from tracedoffload.presets import (
    DEFAULT_BANDWIDTH_GBPS,
    DEFAULT_DEVICE_MEMORY_GBPS,
    DEFAULT_KV_TOKENS,
    DEFAULT_TARGET_UTILIZATION,
    GPU_TIERS,
    MAX_PREFETCH,
    RESIDENCY_POLICIES,
    GiB,
)

# torch and the planner (which imports it) are imported inside `plan`: --help and a bad flag
# answer without them.
DTYPE_NAMES = ("bfloat16", "float16", "float32", "float8_e4m3fn")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="print the offload plan table for a model (reads only its config; no weights are loaded)",
        description="Estimate VRAM, pinned host bytes, copy time and slowdown per number of resident layers.",
    )
    parser.add_argument("--model", metavar="PATH", help="a .gguf file, a model directory or its config.json, or 'random' (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="weights dtype (default: the config's; float32 for a GGUF and the random model)")
    parser.add_argument("--bandwidth-gbps", type=float, default=DEFAULT_BANDWIDTH_GBPS, help="host-to-device copy rate in GB/s (default %(default)s: PCIe 4.0 x16, pinned, measured)")
    parser.add_argument("--compute-ms", type=float, help="measured per-token compute with every layer resident, in ms (default: estimated from --device-memory-gbps)")
    parser.add_argument("--device-memory-gbps", type=float, default=DEFAULT_DEVICE_MEMORY_GBPS, help="device memory bandwidth for the compute estimate (default %(default)s: RTX 4070 spec)")
    parser.add_argument("--kv-tokens", type=int, default=DEFAULT_KV_TOKENS, help="tokens the KV cache must hold, across the batch (default %(default)s)")
    parser.add_argument("--prefetch", type=int, default=1, help=f"offloaded layers copied ahead (0 to {MAX_PREFETCH}); the device pool holds prefetch + 1 layers (default 1)")
    parser.add_argument("--residency", default="interleaved", help=f"which layers stay resident: {', '.join(RESIDENCY_POLICIES)} (default interleaved)")
    parser.add_argument("--every-k", action="store_true", help="a row for every number of resident layers, not only the presets")
    parser.add_argument("--tier", help=f"also show the config a GPU tier preset gives: {', '.join(GPU_TIERS)}")
    parser.add_argument(
        "--measure",
        action="store_true",
        help="measure this machine's copy rate and resident compute per token (loads the model) instead of assuming the GPU below",
    )
    parser.add_argument("--device", default="auto", help="with --measure: auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--json", action="store_true", help="print the table (and the tier's config) as one JSON object")
    parser.set_defaults(handler=plan)


def plan(args: argparse.Namespace) -> int:
    """Print the plan table; every bad flag value raises a ConfigError naming the flag."""
    from tracedoffload.planner import format_table, plan_table, table_to_dict

    _check_flags(args)
    model_plan = _model_plan(args)
    measured = _measure(args) if args.measure else None
    table = plan_table(
        model_plan,
        bandwidth_gbps=measured.copy_gbps if measured else args.bandwidth_gbps,
        compute_ms_per_token=measured.compute_ms_per_token if measured else args.compute_ms,
        device_memory_gbps=args.device_memory_gbps,
        prefetch=args.prefetch,
        residency=args.residency,
        kv_tokens=args.kv_tokens,
        every_k=args.every_k,
    )
    tier = _tier(model_plan, args) if args.tier else None
    figures_for = _figures_for(args, measured)
    if args.json:
        print(json.dumps({**table_to_dict(table), "tier": tier, "figures_for": figures_for}, indent=2))
        return 0
    print(f"figures for: {figures_for}")
    print(format_table(table))
    if tier:
        print(
            f"tier {tier['name']}: OffloadConfig(num_layers_on_gpu={tier['num_layers_on_gpu']}, prefetch={args.prefetch}, "
            f"residency={args.residency!r}), estimated {tier['vram_bytes'] / GiB:.2f} GiB of {tier['tier_bytes'] / GiB:.0f} GiB "
            f"(planned for {tier['target_utilization']:.0%} of it)"
        )
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    for flag, value in (("--bandwidth-gbps", args.bandwidth_gbps), ("--device-memory-gbps", args.device_memory_gbps), ("--compute-ms", args.compute_ms)):
        if value is not None:
            check_positive(flag, value)
    check_int("--kv-tokens", args.kv_tokens, 0)
    check_int("--prefetch", args.prefetch, 0, MAX_PREFETCH)
    check_choice("--residency", args.residency, RESIDENCY_POLICIES)
    if args.tier is not None:
        check_choice("--tier", args.tier, list(GPU_TIERS))


def _measure(args: argparse.Namespace) -> Any:
    """Load the model and measure this machine (see tracedoffload.measure)."""
    import sys

    from tracedoffload.measure import measure
    from tracedoffload.models import load_model
    from tracedoffload.offloader import resolve_device

    device = resolve_device(args.device)
    print(f"tracedoffload: measuring copy rate and resident compute on {device}", file=sys.stderr, flush=True)
    loaded = load_model(args.model, notify=lambda message: print(f"tracedoffload: {message}", file=sys.stderr, flush=True))
    return measure(loaded.model, loaded.tokenizer, device)


def _figures_for(args: argparse.Namespace, measured: Any) -> str:
    """Which device the table's times are for, said plainly (they are not this machine's unless measured)."""
    if measured is not None:
        where = "this machine's CPU: the copies are memcpys that cannot overlap compute, read the no-overlap end of the slowdown" if measured.device == "cpu" else f"this machine's {measured.device}"
        return f"{where}; measured {measured.copy_gbps:.1f} GB/s copy, {measured.compute_ms_per_token:.2f} ms/token resident compute"
    link = "assumed host link" if args.bandwidth_gbps == DEFAULT_BANDWIDTH_GBPS else "given host link"
    compute = f"given compute {args.compute_ms} ms/token" if args.compute_ms else f"a GPU with {args.device_memory_gbps:g} GB/s device memory (RTX 4070 class, assumed)"
    return f"{compute}, {link} {args.bandwidth_gbps:g} GB/s (PCIe 4.0 x16 class), not this machine; --measure measures this one"


def _model_plan(args: argparse.Namespace) -> Any:
    import torch

    from tracedoffload.planner import ModelPlan

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.model is None or args.model == RANDOM_MODEL or is_gguf_path(args.model):
        from tracedoffload.models import load_config

        # A GGUF and the random model load as float32 (a GGUF's weights are dequantized).
        return ModelPlan.from_config(load_config(args.model), dtype or torch.float32)
    try:
        return ModelPlan.from_pretrained_path(args.model, dtype)
    except ConfigError as error:
        if error.field != "path":
            raise
        raise ConfigError("--model", args.model, f"{error.valid}, a .gguf file, or 'random'") from None


def _tier(model_plan: Any, args: argparse.Namespace) -> dict[str, Any]:
    from tracedoffload.planner import config_for_tier, estimate_vram

    config = config_for_tier(model_plan, args.tier, prefetch=args.prefetch, residency=args.residency, kv_tokens=args.kv_tokens)
    vram = estimate_vram(model_plan, config.num_layers_on_gpu, prefetch=args.prefetch, residency=args.residency, kv_tokens=args.kv_tokens)
    return {
        "name": args.tier,
        "tier_bytes": GPU_TIERS[args.tier],
        "target_utilization": DEFAULT_TARGET_UTILIZATION,
        "num_layers_on_gpu": config.num_layers_on_gpu,
        "vram_bytes": vram.total_bytes,
        "config": {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)},
    }


def _jsonable(value: Any) -> Any:
    import torch

    return str(value).removeprefix("torch.") if isinstance(value, (torch.device, torch.dtype)) else value
