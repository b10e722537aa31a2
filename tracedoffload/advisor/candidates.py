"""The configurations the advisor weighs, each with its predicted time and memory.

Every resident layer count from 0 to all, every residency policy, prefetch depths 0, 1, 2 and 4
(and the run's own), at every batch size the trace measured; a prefetch that gives no more slots
than a smaller one (there are only so many offloaded layers) is the same configuration and is
left out, as are residencies and prefetch depths with every layer resident.
"""

from __future__ import annotations

import dataclasses

from tracedoffload.advisor.measured import MeasuredRun
from tracedoffload.advisor.memory import peak_device_memory
from tracedoffload.advisor.model import Choice, StepTime, predict_step
from tracedoffload.config import scale_preset
from tracedoffload.presets import PRESETS, RESIDENCY_POLICIES
from tracedoffload.vram import VramEstimate

PREFETCH_DEPTHS = (0, 1, 2, 4)
# Times within this share of each other are a tie, broken by memory. Candidates that differ only
# in which layers are resident differ by about this much on a CPU (noise in the per-layer means,
# not something the model can tell apart), while one more resident layer saves 1-2 % of a step.
TIE_SHARE = 0.002


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A configuration and what the model predicts for it."""

    choice: Choice
    time: StepTime
    memory: VramEstimate

    @property
    def ms_per_token(self) -> float:
        return self.time.ms_per_token

    @property
    def peak_bytes(self) -> int:
        return self.memory.total_bytes


def evaluate(run: MeasuredRun, choice: Choice) -> Candidate:
    """`choice` with its predicted step time and peak device memory."""
    return Candidate(choice, predict_step(run, choice), peak_device_memory(run, choice))


def measured_choice(run: MeasuredRun) -> Choice:
    """The run's own configuration, at its most measured batch size."""
    batch = max(run.batches, key=lambda b: b.steps)
    return Choice(run.gpu_layers, run.residency, run.prefetch, batch.sequences)


def all_candidates(run: MeasuredRun) -> list[Candidate]:
    """Every configuration the trace can predict (see the module docstring)."""
    counts = range(run.num_layers + 1) if run.transfer_bytes_per_ns is not None else [run.num_layers]
    depths = sorted({*PREFETCH_DEPTHS, run.prefetch})
    found = []
    for batch in run.batches:
        for gpu_layers in counts:
            offloaded = run.num_layers - gpu_layers
            if not offloaded:
                found.append(evaluate(run, Choice(gpu_layers, run.residency, run.prefetch, batch.sequences)))
                continue
            slots_seen: set[int] = set()
            for prefetch in depths:
                slots = min(prefetch + 1, offloaded)
                if slots in slots_seen:
                    continue
                slots_seen.add(slots)
                for residency in RESIDENCY_POLICIES:
                    found.append(evaluate(run, Choice(gpu_layers, residency, prefetch, batch.sequences)))
    return found


def best(candidates: list[Candidate], run: MeasuredRun) -> Candidate:
    """The fastest, counting times within `TIE_SHARE` of it as equal: among those the least
    memory, then the fewest changes from the run's residency and prefetch (a difference the
    model cannot tell from noise is no reason to change), then the least time."""
    fastest = min(c.ms_per_token for c in candidates)
    close = [c for c in candidates if c.ms_per_token <= fastest * (1 + TIE_SHARE)]
    return min(close, key=lambda c: (c.peak_bytes, changes(run, c.choice), c.ms_per_token))


def changes(run: MeasuredRun, choice: Choice) -> int:
    """How many of the run's residency and prefetch `choice` changes."""
    return (choice.residency != run.residency) + (choice.prefetch != run.prefetch)


def table_rows(run: MeasuredRun, candidates: list[Candidate], extra: list[Candidate]) -> list[Candidate]:
    """The rows worth printing: per batch size, the best candidate at each preset's layer count,
    at none and at every layer resident, and `extra` (the run's own, the recommendation); fewest
    resident layers first."""
    counts = {0, run.num_layers, *(scale_preset(layers, run.num_layers) for layers in PRESETS.values())}
    rows = list(extra)
    for sequences in sorted({c.choice.sequences for c in candidates}):
        for gpu_layers in counts:
            group = [c for c in candidates if c.choice.gpu_layers == gpu_layers and c.choice.sequences == sequences]
            if group:
                rows.append(best(group, run))
    unique = list({c.choice: c for c in rows}.values())
    return sorted(unique, key=lambda c: (c.choice.sequences, c.choice.gpu_layers, c.choice.prefetch, c.choice.residency))
