"""Choosing one candidate and saying why, in plain words with figures.

- With `target_ms`: the least device memory that meets it; when none does, the fastest, with how
  far it misses.
- Otherwise the fastest within `device_memory`, or, with no budget given, within the memory the
  run's own configuration needs (a better use of the same memory). Times within 0.2 % are a tie,
  broken by memory (`candidates.best`, `TIE_SHARE`).

Candidates that do not fit `device_memory` are never recommended, and the advice counts them.
"""

from __future__ import annotations

import dataclasses

from tracedoffload.advisor.candidates import TIE_SHARE, Candidate, all_candidates, best, changes, evaluate, measured_choice
from tracedoffload.advisor.measured import MeasuredRun
from tracedoffload.advisor.model import Choice, offloaded_compute_factor
from tracedoffload.config import resident_layer_indices

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Advice:
    """The candidates, the recommendation and the words for it.

    Attributes:
        candidates: every candidate weighed.
        excluded: how many did not fit `device_memory`.
        measured: the run's own configuration, predicted (compare with `measured_ms_per_token`).
        measured_ms_per_token: what the run measured at that configuration.
        recommended: the choice; None only when nothing fits `device_memory`.
        meets_target: whether it meets `target_ms` (None without a target).
        reason: why it was chosen.
        mechanism: what offloading costs here, per layer, and what one more resident layer buys.
        caveats: what this run could not measure that the recommendation depends on.
    """

    candidates: list[Candidate]
    device_memory: int | None
    target_ms: float | None
    excluded: int
    measured: Candidate
    measured_ms_per_token: float
    recommended: Candidate | None
    meets_target: bool | None
    reason: str
    mechanism: str
    caveats: list[str]


def advise(run: MeasuredRun, device_memory: int | None = None, target_ms: float | None = None) -> Advice:
    """Weigh every candidate and recommend one (see the module docstring)."""
    candidates = all_candidates(run)
    measured = evaluate(run, measured_choice(run))
    measured_ms = run.batch(measured.choice.sequences).ms_per_token
    fitting = [c for c in candidates if device_memory is None or c.peak_bytes <= device_memory]
    excluded = len(candidates) - len(fitting)
    meets: bool | None = None
    if not fitting:
        smallest = min(candidates, key=lambda c: c.peak_bytes)
        chosen = None
        reason = f"none of the {len(candidates)} candidates fits {_mib(device_memory)}: the smallest, {label(run, smallest.choice)}, needs {_mib(smallest.peak_bytes)}"
    elif target_ms is not None:
        chosen, meets, reason = _for_target(run, fitting, target_ms)
    else:
        budget = device_memory if device_memory is not None else measured.peak_bytes
        chosen = best([c for c in fitting if c.peak_bytes <= budget], run)
        within = f"fits {_mib(device_memory)}" if device_memory is not None else f"needs no more device memory than the run's own configuration ({_mib(budget)})"
        reason = f"the fastest that {within}"
        faster = [c for c in candidates if c.ms_per_token < chosen.ms_per_token * (1 - TIE_SHARE) and c.peak_bytes > budget]
        if faster:
            cheapest = min(faster, key=lambda c: c.peak_bytes)
            reason += f"; faster needs more: {label(run, cheapest.choice)} would take {cheapest.ms_per_token:.1f} ms/token in {_mib(cheapest.peak_bytes)}"
        if device_memory is None:
            reason += " (give --device-memory or --target-ms-per-token to trade memory for time)"
    mechanism = _mechanism(run, chosen or measured)
    return Advice(candidates, device_memory, target_ms, excluded, measured, measured_ms, chosen, meets, reason, mechanism, _caveats(run, chosen))


def _caveats(run: MeasuredRun, chosen: Candidate | None) -> list[str]:
    """What the figures behind `chosen` rest on that the run could not measure."""
    caveats = []
    if run.transfer_bytes_per_ns is not None and (all(run.offloaded) or not any(run.offloaded)):
        state = "offloaded" if all(run.offloaded) else "resident"
        caveats.append(
            f"every layer was {state} in the run, so a layer's compute in the other state was not measured and is taken as equal; "
            "on a CPU a layer computes faster just after its copy (warm caches), so a trace with layers of both kinds predicts better"
        )
    if chosen is not None and not run.copy_engine and (chosen.choice.prefetch == 0) != (run.prefetch == 0):
        caveats.append(
            f"on a CPU prefetch overlaps nothing but moves each copy relative to its layer's compute: the run's copies and offloaded "
            f"layers were measured at prefetch {run.prefetch}; at prefetch 0 a copy lands just before its layer, warmer in the caches, "
            "and runs faster than this predicts (slower, the other way round)"
        )
    return caveats


def _for_target(run: MeasuredRun, fitting: list[Candidate], target_ms: float) -> tuple[Candidate, bool, str]:
    meeting = [c for c in fitting if c.ms_per_token <= target_ms]
    if not meeting:
        closest = min(fitting, key=lambda c: (c.ms_per_token, c.peak_bytes))
        miss = closest.ms_per_token / target_ms - 1
        return closest, False, f"none meets {target_ms:g} ms/token; the closest, {closest.ms_per_token:.1f} ms/token, misses it by {100 * miss:.0f} %"
    chosen = min(meeting, key=lambda c: (c.peak_bytes, changes(run, c.choice), c.ms_per_token))
    reason = f"the least device memory that meets {target_ms:g} ms/token"
    if chosen.choice.gpu_layers > 0:
        fewer = _neighbour(run, chosen, -1)
        reason += f"; one resident layer fewer would take {fewer.ms_per_token:.1f} ms/token"
    return chosen, True, reason


def _neighbour(run: MeasuredRun, candidate: Candidate, step: int) -> Candidate:
    choice = candidate.choice
    return evaluate(run, dataclasses.replace(choice, gpu_layers=choice.gpu_layers + step))


def _mechanism(run: MeasuredRun, around: Candidate) -> str:
    """What an offloaded layer costs on this device and what one more resident layer buys, from
    two neighbouring layer counts at `around`'s residency and prefetch, taken where the slot pool
    keeps its size (with fewer than prefetch + 1 layers offloaded, the last ones free a slot too)."""
    if run.transfer_bytes_per_ns is None:
        return "the run copied no layer, so no copy rate was measured: only every layer resident is predicted"
    choice = around.choice
    steady_top = run.num_layers - (choice.prefetch + 1) - 1  # k + 1 still offloads prefetch + 1 layers
    fewer = evaluate(run, dataclasses.replace(choice, gpu_layers=max(0, min(choice.gpu_layers, steady_top))))
    more = _neighbour(run, fewer, 1)
    saves = fewer.ms_per_token - more.ms_per_token
    costs = more.peak_bytes - fewer.peak_bytes
    gbps = run.transfer_bytes_per_ns
    layer = max(run.layer_bytes)
    factor = offloaded_compute_factor(run, choice.sequences)
    warm = f"; an offloaded layer computed {100 * (1 - factor):.0f} % faster than a resident one (weights warm after the copy)" if factor < 1 else ""
    if run.copy_engine:
        offloaded = [size for i, size in enumerate(run.layer_bytes) if i not in set(resident_layer_indices(choice.residency, run.num_layers, choice.gpu_layers))]
        time = around.time
        return (
            f"copies of the {len(offloaded)} offloaded layers take {sum(offloaded) / gbps / 1e6:.2f} ms per step at {gbps:.3g} GB/s beside "
            f"{time.compute_ns / 1e6:.2f} ms of compute, and {time.offload_ns / 1e6:.2f} ms of them are not hidden behind it: "
            f"each extra resident layer saves {saves:.2f} ms per token and costs {_mib(costs)}"
        )
    return (
        f"on {run.device} copies do not overlap compute (the same cores do both): each offloaded layer adds its copy, "
        f"{layer / gbps / 1e6:.2f} ms ({_mib(layer)} at {gbps:.3g} GB/s), and {2 * run.swap_ns / 1e6:.2f} ms of pointer swaps{warm}; "
        f"each extra resident layer saves {saves:.2f} ms per token and costs {_mib(costs)}"
    )


def label(run: MeasuredRun, choice: Choice) -> str:
    """The configuration in words: how many layers resident, the residency and prefetch."""
    batch = f", {choice.sequences} sequences per step" if len(run.batches) > 1 else ""
    return f"{choice.gpu_layers} of {run.num_layers} resident ({choice.residency}, prefetch {choice.prefetch}{batch})"


def describe(run: MeasuredRun, candidate: Candidate) -> str:
    """One line: the configuration, its time and its memory."""
    return f"{label(run, candidate.choice)}: {candidate.ms_per_token:.1f} ms/token, {_mib(candidate.peak_bytes)} peak device memory"


def _mib(nbytes: int | None) -> str:
    """Bytes in MiB, or KiB below one MiB (a tiny test model's layers)."""
    nbytes = nbytes or 0
    return f"{nbytes / MiB:,.1f} MiB" if abs(nbytes) >= MiB else f"{nbytes / 1024:,.1f} KiB"
