"""What background CPU costs the model's token time on this host: prints figures (not a timed test).

The telemetry's CPU runs beside the model on the same cores. This bench burns a fixed duty of
CPU (`--burn-us` every `--period-ms`, about one token) while the default model generates, in
three places, and prints each token latency over the undisturbed one (interleaved rounds,
medians of per-round ratios):

- `thread`:  a Python thread running Python (it takes the GIL, as the telemetry thread does);
- `nogil`:   a thread hashing buffers (hashlib releases the GIL): CPU without the GIL;
- `process`: another process running Python: no shared GIL at all.

If `process` costs as much as `thread`, the cost is the cores, and moving the telemetry out of
the interpreter would not help on this host; only less CPU would. The printed duty is the
share of the time the burner is busy, to set beside bench_telemetry_cpu.py's telemetry share.

    python bench/bench_background_cpu.py --rounds 12
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import statistics
import threading
import time

from tracedoffload import OffloadConfig, offload
from tracedoffload.generation import generate_once

from _model import add_model_argument, load_bench_model

PROMPT = "Offloading traces."
PLACES = ("off", "thread", "nogil", "process")
_BUFFER = bytes(1 << 16)  # hashlib releases the GIL for buffers over 2 KiB


def _burn_python(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        sum(range(200))


def _burn_without_gil(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        hashlib.sha256(_BUFFER).digest()


def _burner(without_gil: bool, burn_s: float, period_s: float, stop) -> None:
    burn = _burn_without_gil if without_gil else _burn_python
    while not stop.is_set():
        burn(burn_s)
        time.sleep(period_s)


def ms_per_token(model, tokenizer, place: str, tokens: int, burn_s: float, period_s: float) -> float:
    worker: threading.Thread | multiprocessing.Process | None = None
    if place == "process":
        stop = multiprocessing.Event()  # shared with the forked burner
        worker = multiprocessing.Process(target=_burner, args=(False, burn_s, period_s, stop), daemon=True)
        worker.start()
        time.sleep(0.3)  # started and burning before the clock starts
    else:
        stop = threading.Event()
        if place != "off":
            worker = threading.Thread(target=_burner, args=(place == "nogil", burn_s, period_s, stop), daemon=True)
            worker.start()
    generation = generate_once(model, tokenizer, PROMPT, tokens, None, "default", ignore_eos=True)
    stop.set()
    if worker is not None:
        worker.join()
    return 1e3 * generation.seconds / generation.generated_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--burn-us", type=float, default=600.0)
    parser.add_argument("--period-ms", type=float, default=22.0)
    add_model_argument(parser)
    args = parser.parse_args()
    multiprocessing.set_start_method("fork", force=True)

    loaded = load_bench_model(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    offloader = offload(model, OffloadConfig(num_layers_on_gpu=len(model.model.layers) // 2, device="cpu"))
    burn_s, period_s = args.burn_us / 1e6, args.period_ms / 1e3
    results: dict[str, list[float]] = {place: [] for place in PLACES}
    ms_per_token(model, tokenizer, "off", 8, burn_s, period_s)  # warm-up
    for round_index in range(args.rounds):
        shift = round_index % len(PLACES)
        for place in PLACES[shift:] + PLACES[:shift]:
            results[place].append(ms_per_token(model, tokenizer, place, args.tokens, burn_s, period_s))
    offloader.detach()

    off = statistics.median(results["off"])
    print(f"{args.rounds} interleaved rounds x {args.tokens} tokens; burning {args.burn_us:.0f} us of CPU every {args.period_ms:.1f} ms")
    duty = burn_s / (burn_s + period_s)  # compare with telemetry CPU / model CPU (bench_telemetry_cpu.py)
    print(f"  undisturbed: median {off:.2f} ms/token; the burner is busy {duty:.4f} of the time")
    for place in PLACES[1:]:
        paired = statistics.median(r / o for r, o in zip(results[place], results["off"], strict=True))
        print(f"  {place:<8} / off = {paired:.4f} (median of per-round ratios); median {statistics.median(results[place]):.2f} ms/token")


if __name__ == "__main__":
    main()
