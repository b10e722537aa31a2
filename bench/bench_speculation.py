"""Speculative decoding over the offloaded default model: prints figures (not a timed test).

The default model with the `balanced` preset, greedy, in this process, one offloader and one
tracing session (statistics from its step spans, no exporter). Two tasks:
  grounded   rewrite a given paragraph: the answer repeats the input, so prompt lookup finds matches;
  open       an open question: the answer repeats little.
Per task, interleaved over `--rounds` rounds (medians): plain decoding, then prompt lookup with
`--lookup-tokens` drafted tokens per step. Printed per configuration: generated tokens per second,
offloaded forwards per generated token, host-to-device bytes per generated token, acceptance rate;
and whether the greedy output is identical to plain decoding's (it must be).

Goal on the grounded task: forwards per generated token <= 0.5 and bytes per generated token at
most half of plain decoding's, with identical output.

Then early-exit self-speculation with the model's first `--early-exit` layers, under the same
preset with those layers resident (`residency="first"`: as many offloaded layers, so the same
bytes per forward). SmolLM2 was not trained to exit early: its early layers' drafts are mostly
refused, and the row shows what that costs.

A draft model needs a smaller model with the same vocabulary, which this machine does not have
offline (SmolLM2-135M is the smallest of its family); --draft-model PATH adds that configuration.

    python bench/bench_speculation.py --rounds 3 --max-new-tokens 96 [--early-exit 8] [--draft-model PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _model import add_model_argument, load_bench_model  # noqa: E402

from tracedoffload import OffloadConfig, offload  # noqa: E402
from tracedoffload.generation import generate_once  # noqa: E402
from tracedoffload.speculation import Speculation  # noqa: E402
from tracedoffload.tracing.sampling import SamplingPolicy  # noqa: E402
from tracedoffload.tracing.session import TracingSession  # noqa: E402

PARAGRAPH = (
    "The lighthouse on the northern cape was built in 1872 from granite quarried on the island. "
    "Its lamp burned whale oil until 1901, then kerosene, and since 1956 it has been electric. "
    "The keeper's cottage beside it is now a small museum that opens every summer."
)
TASKS = {
    "grounded": f"Rewrite this paragraph with the same words, fixing nothing:\n\n{PARAGRAPH}",
    "open": "What makes a good friend? Answer in a few sentences.",
}


def measure(model, tokenizer, residency: str, prompt: str, tokens: int, speculation) -> dict:
    offloader = offload(model, OffloadConfig(preset="balanced", residency=residency))
    session = TracingSession([], policy=SamplingPolicy(level="token"))
    session.attach(offloader)
    try:
        generation = generate_once(model, tokenizer, prompt, tokens, session, "bench", speculation=speculation)
        session.drain(30)
        stats = session.snapshot()
    finally:
        session.shutdown(5)
        offloader.detach()
    per_token = stats["per_generated_token"]
    return {
        "text": generation.text,
        "tokens": generation.generated_tokens,
        "tok_s": generation.generated_tokens / generation.seconds,
        "forwards": per_token["steps"],
        "bytes": per_token["transfer_bytes"],
        "acceptance": stats["acceptance_rate"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--lookup-tokens", type=int, default=10)
    parser.add_argument("--early-exit", type=int, default=8, help="layers the early exit drafts with (0: no early-exit row)")
    parser.add_argument("--draft-model", default=None)
    args = parser.parse_args()
    loaded = load_bench_model(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    # name -> (residency, speculation)
    configurations = {"plain": ("interleaved", None), f"prompt lookup {args.lookup_tokens}": ("interleaved", Speculation(prompt_lookup_tokens=args.lookup_tokens))}
    if args.early_exit:
        configurations[f"early exit {args.early_exit}"] = ("first", Speculation(early_exit_layers=args.early_exit, draft_tokens=5, schedule="heuristic"))
    if args.draft_model:
        from tracedoffload.models import load_model

        draft = load_model(args.draft_model).model
        configurations["draft model"] = ("interleaved", Speculation(draft_model=draft, draft_tokens=5, schedule="heuristic"))
    probe = offload(model, OffloadConfig(preset="balanced"))
    print(f"balanced preset: {len(probe.offloaded_indices)} of {len(probe.layers)} layers offloaded; {args.max_new_tokens} new tokens at most; {args.rounds} rounds, interleaved", flush=True)
    probe.detach()
    results: dict[tuple[str, str], list[dict]] = {}
    measure(model, tokenizer, "interleaved", TASKS["open"], 8, None)  # warm-up, not counted
    for _ in range(args.rounds):
        for task, prompt in TASKS.items():
            for name, (residency, speculation) in configurations.items():
                results.setdefault((task, name), []).append(measure(model, tokenizer, residency, prompt, args.max_new_tokens, speculation))
    for task in TASKS:
        plain = results[(task, "plain")]
        print(f"\n{task}: {TASKS[task][:70]!r}...")
        print(f"  {'configuration':<18} {'tok/s':>7} {'forwards/tok':>13} {'H2D MB/tok':>11} {'acceptance':>11}  same output")
        for name in configurations:
            runs = results[(task, name)]
            median = {key: statistics.median(r[key] for r in runs) for key in ("tok_s", "forwards", "bytes")}
            acceptance = runs[0]["acceptance"]
            same = all(r["text"] == p["text"] for r, p in zip(runs, plain))
            print(
                f"  {name:<18} {median['tok_s']:>7.2f} {median['forwards']:>13.4f} {median['bytes'] / 1e6:>11.3f} "
                f"{'-' if acceptance is None else f'{acceptance:.4f}':>11}  {'yes' if same else 'NO'}"
            )
        for name in list(configurations)[1:]:
            runs = results[(task, name)]
            speedup = statistics.median(r["tok_s"] / p["tok_s"] for r, p in zip(runs, plain))
            bytes_ratio = statistics.median(r["bytes"] / p["bytes"] for r, p in zip(runs, plain))
            forwards = statistics.median(r["forwards"] for r in runs)
            print(f"  {name}: tokens/s {speedup:.4f}x plain; bytes per token {bytes_ratio:.4f} of plain (goal <= 0.5 on grounded); forwards per token {forwards:.4f} (goal <= 0.5 on grounded)")


if __name__ == "__main__":
    main()
