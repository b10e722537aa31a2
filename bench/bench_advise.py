"""`tracedoffload advise` checked against real runs: prints predicted and measured figures (not a
timed test).

Per round, each run a separate `tracedoffload run` process writing its trace (--trace-level token):
  base        the `balanced` preset (the default model: 13 of 30 resident, prefetch 1);
  advise      `tracedoffload advise --json` on the base run's trace;
  A, B, C     three of the configurations it predicted, run with the flags it printed for them:
              its row with the fewest resident layers, the row at the `light` preset's count, and
              its row with every layer resident (three layer counts, and prefetch and residency as
              the advisor picked them), in rotating order. A configuration is named by its layer
              count: where residencies tie to within noise, the advisor's pick among them may
              differ from round to round, and each round runs the one it predicted.
Measured ms per token of a run: the median, over its decode steps, of the time from one step's
start to the next's (the prefill excluded), read from its own trace. Each configuration's
prediction comes from the same round's base run, so a noisy phase of the host moves both sides of
a round together. Printed per configuration: the medians over rounds of predicted and measured,
their ratio, and the median of the per-round ratios. Goal: within 15 % (0.85-1.15) on this CPU.

--torch-threads N sets OMP_NUM_THREADS for every run, base and re-runs alike. On this 2-core host
torch's default of 2 threads slows down by 20-40 times (not by half) while another process takes
a core, and such phases come and go within a round; one thread shares the host gracefully.

    python bench/bench_advise.py --rounds 5 --tokens 48 [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tracedoffload import names
from tracedoffload.config import scale_preset
from tracedoffload.presets import PRESETS
from tracedoffload.tracing.exporters.jsonl import read_otlp_jsonl


def run_traced(flags: list[str], trace: Path, args: argparse.Namespace) -> None:
    """One `tracedoffload run` in its own process (the CLI a user runs), its trace written to `trace`."""
    model = ["--model", args.model] if args.model else []
    command = [sys.executable, "-m", "tracedoffload", "run", *model, "--max-new-tokens", str(args.tokens), "--trace-level", "token", "--trace-file", str(trace), "--no-progress", "--json", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else None
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")


def advise(trace: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "tracedoffload", "advise", str(trace), "--json"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"advise failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def measured_ms_per_token(trace: Path) -> float:
    """The median decode step period of a run, from its trace (independent of the advisor's code)."""
    steps = sorted((s for s in read_otlp_jsonl(trace) if s.name == names.SPAN_STEP), key=lambda s: s.start_ns)
    periods = [
        (following.start_ns - step.start_ns) / 1e6
        for step, following in itertools.pairwise(steps)
        if step.attributes[names.STEP_PHASE] == following.attributes[names.STEP_PHASE] == names.PHASE_DECODE
    ]
    return statistics.median(periods)


def pick_three(advice: dict) -> list[dict]:
    """The advised rows with the fewest resident layers, at the `light` preset's count, and all resident."""
    rows = advice["candidates"]
    layers = advice["layers"]
    light = scale_preset(PRESETS["light"], layers)
    fewest = min(rows, key=lambda r: r["gpu_layers"])
    middle = min(rows, key=lambda r: (abs(r["gpu_layers"] - light), r["peak_device_bytes"]))
    most = max(rows, key=lambda r: (r["gpu_layers"], -r["peak_device_bytes"]))
    return [fewest, middle, most]


def describe(row: dict, layers: int) -> str:
    return f"{row['gpu_layers']} of {layers} resident"


def settings(row: dict) -> str:
    return f"{row['residency']}, prefetch {row['prefetch']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a .gguf file, a model directory or 'random' (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--torch-threads", type=int, default=None, help="OMP_NUM_THREADS for every run (default: torch's own)")
    args = parser.parse_args()

    # Another process on these two cores slows torch's threads by several times, not by half:
    # the load average says whether the figures below were taken on a quiet host.
    print(f"host load average (1, 5, 15 min) at the start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"torch threads per run: {args.torch_threads or 'torch default'}", flush=True)
    predicted: dict[str, list[float]] = {}
    measured: dict[str, list[float]] = {}
    base_measured: list[float] = []
    base_predicted: list[float] = []
    labels: list[str] = []
    picked: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            base = Path(scratch) / f"base-{round_index}.otlp.jsonl"
            run_traced(["--preset", "balanced"], base, args)
            advice = advise(base)
            layers = advice["layers"]
            base_measured.append(advice["measured"]["measured_ms_per_token"])
            base_predicted.append(advice["measured"]["ms_per_token"])
            rows = pick_three(advice)
            if not labels:
                labels = [describe(row, layers) for row in rows]
            shift = round_index % len(rows)
            for position in [*range(shift, len(rows)), *range(shift)]:
                row, label = rows[position], labels[position]
                if describe(row, layers) != label:
                    raise SystemExit(f"round {round_index}: the advisor's row changed from {label} to {describe(row, layers)}")
                trace = Path(scratch) / f"run-{round_index}-{position}.otlp.jsonl"
                run_traced(row["run_flags"], trace, args)
                predicted.setdefault(label, []).append(row["ms_per_token"])
                picked.setdefault(label, []).append(settings(row))
                measured.setdefault(label, []).append(measured_ms_per_token(trace))
            print(f"  round {round_index}: base {base_measured[-1]:.2f} ms/token; " + "; ".join(
                f"{label} ({picked[label][-1]}): predicted {predicted[label][-1]:.2f}, measured {measured[label][-1]:.2f}" for label in labels
            ), flush=True)

    print(f"\nhost load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"base run: balanced preset, {args.tokens} tokens, medians of {args.rounds} rounds: measured {statistics.median(base_measured):.2f} ms/token "
          f"(min-max {min(base_measured):.2f}-{max(base_measured):.2f}), the model's figure for it {statistics.median(base_predicted):.2f}")
    print("predicted from each round's base run, measured by running it (decode ms per token, medians over rounds):")
    for name, label in zip("ABC", labels, strict=True):
        p, m = statistics.median(predicted[label]), statistics.median(measured[label])
        paired = statistics.median(a / b for a, b in zip(predicted[label], measured[label], strict=True))
        runs = ", ".join(f"{count} x {setting}" for setting, count in sorted(collections.Counter(picked[label]).items()))
        print(f"  {name} {label} ({runs}): predicted {p:.2f}, measured {m:.2f} (min-max {min(measured[label]):.2f}-{max(measured[label]):.2f})")
        print(f"    {name} predicted / measured = {p / m:.4f} (median of per-round ratios {paired:.4f}; goal 0.85-1.15)")


if __name__ == "__main__":
    main()
