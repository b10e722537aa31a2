"""`tracedoffload plan`: the VRAM table (GPU layers vs estimated VRAM vs expected slowdown)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from tracedoffload._exceptions import ConfigError
from tracedoffload.planner import DEFAULT_BANDWIDTH_GBPS, DEFAULT_KV_TOKENS, GPU_TIERS, ModelPlan, config_for_tier, format_table, plan_table

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plan", help="print the offload plan table for a model (no weights are loaded)", description=__doc__)
    parser.add_argument("--model", metavar="PATH", help="a local model directory or config.json (default: the embedded model)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: the config's, float32 for the embedded model)")
    parser.add_argument("--bandwidth-gbps", type=float, default=DEFAULT_BANDWIDTH_GBPS, help="host-to-device copy rate (default %(default)s, PCIe 4.0 x16 pinned)")
    parser.add_argument("--kv-tokens", type=int, default=DEFAULT_KV_TOKENS, help="tokens of KV cache to leave room for (default %(default)s)")
    parser.add_argument("--prefetch", type=int, default=1, help="prefetch depth: the device pool holds prefetch + 1 layers (default 1)")
    parser.add_argument("--compute-ms", type=float, default=None, help="resident compute ms per token, measured (e.g. `tracedoffload run --num-gpu-layers N`); default: an assumption stated in the table")
    parser.add_argument("--every-k", action="store_true", help="a row for every number of resident layers, not only the presets")
    parser.add_argument("--tier", choices=sorted(GPU_TIERS), help="also show the config a GPU tier preset gives")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.set_defaults(handler=plan)


def plan(args: argparse.Namespace) -> int:
    if not 0 <= args.prefetch <= 8:
        raise ConfigError("prefetch", args.prefetch, "an integer from 0 to 8")
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.model:
        model_plan = ModelPlan.from_path(args.model, dtype)
    else:
        from tracedoffload.default_model import default_model_config

        model_plan = ModelPlan.from_config(default_model_config(), dtype or torch.float32)
    rows = plan_table(model_plan, bandwidth_gbps=args.bandwidth_gbps, compute_ms_per_token=args.compute_ms, prefetch=args.prefetch, kv_tokens=args.kv_tokens, every_k=args.every_k)
    if args.json:
        print(json.dumps({"plan": {**dataclasses.asdict(model_plan), "dtype": str(model_plan.dtype)}, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    else:
        print(format_table(rows, model_plan, args.bandwidth_gbps, args.compute_ms))
    if args.tier:
        config = config_for_tier(model_plan, args.tier, prefetch=args.prefetch)
        print(f"tier {args.tier}: OffloadConfig(num_layers_on_gpu={config.num_layers_on_gpu}, prefetch={config.prefetch})")
    return 0
