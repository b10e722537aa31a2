"""`tracedoffload verify` (and `run --verify`): the prompt, greedy, with every layer resident and
then offloaded; both runs' tokens and their logits' largest difference per position. Exit 0 when
they agree, 1 at the first diverging position (its index is printed).

    tracedoffload verify                               # the default model, the balanced preset
    tracedoffload verify --preset aggressive --max-new-tokens 64
    tracedoffload verify --model model.gguf --device cuda --atol 1e-2   # a new GPU, in CI
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from tracedoffload._checks import check_int
from tracedoffload._exceptions import ConfigError
from tracedoffload.cli import model_flags, prompt_flags
from tracedoffload.cli.progress import notify

EXIT_DIVERGED = 1
VERIFY_DEFAULT_TOKENS = 32


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check the offloaded model against the same model with every layer resident (exit 1 where they diverge)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model_flags.add_arguments(parser)
    prompt_flags.add_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=VERIFY_DEFAULT_TOKENS, help=f"tokens to compare at most (default {VERIFY_DEFAULT_TOKENS})")
    add_verify_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    parser.set_defaults(handler=verify)


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `verify` and `run --verify` share."""
    from tracedoffload.verify import DEFAULT_ATOL

    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"largest absolute logit difference taken as agreement (default {DEFAULT_ATOL:g})")
    parser.add_argument("--corrupt-layer", type=int, metavar="N", help="fault drill: zero the device copy of offloaded layer N after each transfer (verify must then fail)")


def verify(args: argparse.Namespace) -> int:
    """Load the model, compare, print; 0 when the runs agree, 1 when they diverge.

    Raises:
        TracedOffloadError: bad flags (naming the field), a model that does not fit resident.
    """
    check_int("max_new_tokens", args.max_new_tokens, 1)
    if not (math.isfinite(args.atol) and args.atol >= 0):
        raise ConfigError("atol", args.atol, "a number >= 0")
    if args.no_offload:
        raise ConfigError("no_offload", True, "not with verify, which compares the offloaded model with the resident one")
    if args.corrupt_layer is not None:
        check_int("corrupt_layer", args.corrupt_layer, 0)
    config = model_flags.offload_config(args)

    from tracedoffload.models import load_model
    from tracedoffload.verify import verify_offload

    config, dtype = model_flags.with_dtype(config, args)
    notify(f"loading {args.model or 'the default model'}")
    loaded = load_model(args.model, dtype, seed=args.seed, notify=notify)
    notify("generating with every layer resident, then offloaded")
    verdict = verify_offload(
        loaded.model, loaded.tokenizer, args.prompt, args.max_new_tokens, config, system=args.system, raw=args.raw, atol=args.atol, corrupt_layer=args.corrupt_layer
    )
    print(json.dumps(_as_json(verdict, loaded), indent=2) if args.json else _as_text(verdict, loaded), flush=True)
    return 0 if verdict.identical else EXIT_DIVERGED


def _as_text(verdict: Any, loaded: Any) -> str:
    decode = _decoder(loaded.tokenizer)
    lines = [
        f"model            {loaded.name}",
        f"offloaded layers {len(verdict.offloaded_layers)} {list(verdict.offloaded_layers)}",
        f"prompt tokens    {verdict.prompt_tokens}",
        "",
        f"{'position':>8}  {'resident token':<20} {'offloaded token':<20} {'max |Δ logit|':>14}",
    ]
    for p in verdict.positions:
        diff = "-" if p.max_abs_logit_diff is None else f"{p.max_abs_logit_diff:.3g}"
        mark = "  <- diverges" if p.index == verdict.first_divergence else ""
        lines.append(f"{p.index:>8}  {decode(p.resident_token):<20} {decode(p.offloaded_token):<20} {diff:>14}{mark}")
    lines.append("")
    if verdict.identical:
        lines.append(f"identical: {len(verdict.positions)} tokens equal, logits within {verdict.atol:g} (largest difference {verdict.max_abs_logit_diff:.3g})")
    else:
        p = verdict.positions[-1]
        why = "the tokens differ" if p.resident_token != p.offloaded_token else f"the logits differ by {p.max_abs_logit_diff:.3g} > {verdict.atol:g}"
        lines.append(f"DIVERGED at position {verdict.first_divergence}: {why}")
    return "\n".join(lines)


def _as_json(verdict: Any, loaded: Any) -> dict[str, Any]:
    decode = _decoder(loaded.tokenizer, quoted=False)
    return {
        "model": loaded.name,
        "identical": verdict.identical,
        "first_divergence": verdict.first_divergence,
        "atol": verdict.atol,
        "max_abs_logit_diff": verdict.max_abs_logit_diff,
        "prompt_tokens": verdict.prompt_tokens,
        "offloaded_layers": list(verdict.offloaded_layers),
        "positions": [
            {
                "index": p.index,
                "resident_token": p.resident_token,
                "resident_text": decode(p.resident_token),
                "offloaded_token": p.offloaded_token,
                "offloaded_text": decode(p.offloaded_token),
                "max_abs_logit_diff": p.max_abs_logit_diff,
            }
            for p in verdict.positions
        ],
    }


def _decoder(tokenizer: Any, quoted: bool = True) -> Any:
    def decode(token: int | None) -> str | None:
        if token is None:
            return "(stopped)" if quoted else None
        text = tokenizer.decode([token], skip_special_tokens=False)
        return repr(text) if quoted else text

    return decode
