"""The time model: how long a decode step takes with another resident layer count, residency
policy, prefetch depth or batch size, from one run's measured per-layer figures (`measured.py`).

Per layer i of a candidate, at the candidate's batch size (the run's figures for that size):

- compute c_i: the layer's measured forward time (the mean over the run's typical steps, see
  `measured.py`), in the state it had in the run. A layer whose state changes is scaled by the
  run's own ratio of offloaded to resident layers' compute (the median layer of each group): on a CPU a layer whose weights were just copied computes from warm
  caches, faster. The ratio is 1 when every layer of the run was in one state.
- transfer t_i = layer_bytes_i / the run's measured copy rate, when the candidate offloads it.

Without a copy engine (a CPU device: the same cores copy and compute) nothing overlaps, and the
prefetch depth changes when a copy happens, not how long a step takes:

    step = other + sum_i c_i + sum_offloaded (t_i + 2 x swap)

where `swap` is the measured release (the pointer swap back to the host buffer) and its twin
before the forward (the swap-in, in no span) is taken to cost the same; `other` is the run's time
outside the layers' spans (embeddings, final norm, lm_head, the hooks) less the swap-ins it held.

With a copy engine (a CUDA device) copies run in order on one copy stream beside compute. The
k-th offloaded layer's copy starts once the copy stream is free and its slot is: there are
min(prefetch + 1, offloaded) slots, taken in turn, so a slot frees when the compute of the
offloaded layer that many copies earlier ends. A layer computes once the previous one is done and
its own copy has landed. The steady step is simulated over consecutive steps (copies for the next
step run behind this step's tail, as the offloader's wrap-around prefetch does), so in effect

    step = other + sum_i max(c_i, the part of layer i's copy not hidden behind earlier computes)

and the host's own work (hooks, swaps) is taken to run ahead of the device, hidden.

    ms per token = (step + the run's gap between steps) / sequences per step

Where it breaks:

- A GPU: never measured here (no GPU on this machine): the overlap above is simulated, not
  checked against a run. Copies and kernels contend for memory bandwidth and PCIe (a full-rate
  copy slows the kernels beside it), a device with several copy engines or a host slower than
  the device (copies issued late, kernels starved) does otherwise, and none of that is modelled.
- Batch size: a layer's compute grows with the tokens of its forward in a way that one batch size
  cannot tell, so only batch sizes the trace ran are predicted, each from its own steps (`serve`).
- KV growth: decode attention reads the whole KV cache, so compute grows with the context; the
  figures are means over the run's contexts, and a much longer generation runs slower.
- The first tokens: a prefill's time grows with its prompt and is not predicted (time to first
  token); nor are chunked prefills mixed into decode steps.
- Caches on a CPU: an offloaded layer computes from the copy it just made, warmer in the caches
  than a resident layer, and how much warmer depends on how close the copy is to the compute: at
  prefetch 0 it lands right before, at prefetch 1 another layer computes in between. A run
  measures the warmth (and the copy rate) at its own prefetch only, and a run with every layer in
  one state cannot measure it at all; the advice says so when its recommendation depends on it.
- A busy host: other processes slow some steps; the typical steps leave a few out, not a whole
  busy run, and a run measured in a quiet phase predicts a busy one badly (and the other way).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence

from tracedoffload.advisor.measured import MeasuredRun
from tracedoffload.config import resident_layer_indices

# Consecutive steps simulated before the step that is measured: enough for the copy stream's
# backlog to settle (it does within two steps: the slots bound how far copies run ahead).
_SIMULATED_STEPS = 6


@dataclasses.dataclass(frozen=True)
class Choice:
    """One candidate configuration: what `run --num-gpu-layers --residency --prefetch` (and
    `serve --max-batch-size`) set."""

    gpu_layers: int
    residency: str
    prefetch: int
    sequences: int = 1


@dataclasses.dataclass(frozen=True)
class StepTime:
    """A predicted decode step, term by term (nanoseconds).

    Attributes:
        compute_ns: the layers' forwards.
        offload_ns: what offloading adds to the step: copies and swaps on a CPU, the copies'
            unhidden part with a copy engine.
        other_ns: the step's time outside the layers.
        gap_ns: between steps (the run's: sampling, the generation loop).
        sequences: tokens one step generates.
    """

    compute_ns: float
    offload_ns: float
    other_ns: float
    gap_ns: float
    sequences: int

    @property
    def step_ns(self) -> float:
        return self.compute_ns + self.offload_ns + self.other_ns

    @property
    def ms_per_token(self) -> float:
        return (self.step_ns + self.gap_ns) / self.sequences / 1e6


def offloaded_compute_factor(run: MeasuredRun, sequences: int) -> float:
    """The median offloaded layer's compute over the median resident layer's (1 with one group)."""
    compute = run.batch(sequences).compute_ns
    offloaded = [c for c, moved in zip(compute, run.offloaded) if moved]
    resident = [c for c, moved in zip(compute, run.offloaded) if not moved]
    if not offloaded or not resident or statistics.median(resident) <= 0:
        return 1.0
    return statistics.median(offloaded) / statistics.median(resident)


def layer_compute_ns(run: MeasuredRun, sequences: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per layer, its compute (resident, offloaded) at `sequences` sequences per step."""
    factor = offloaded_compute_factor(run, sequences)
    resident, offloaded = [], []
    for measured, moved in zip(run.batch(sequences).compute_ns, run.offloaded):
        resident.append(measured / factor if moved else measured)
        offloaded.append(measured if moved else measured * factor)
    return tuple(resident), tuple(offloaded)


def predict_step(run: MeasuredRun, choice: Choice) -> StepTime:
    """The decode step `choice` would take, by the model in the module docstring.

    Raises:
        ValueError: `choice` offloads layers but the run copied none (no rate was measured), or
            its batch size is not one the run measured.
    """
    batch = run.batch(choice.sequences)
    resident_set = set(resident_layer_indices(choice.residency, run.num_layers, choice.gpu_layers))
    offloaded = [i not in resident_set for i in range(run.num_layers)]
    if any(offloaded) and run.transfer_bytes_per_ns is None:
        raise ValueError("the run copied no layer, so no copy rate was measured: only every layer resident can be predicted")
    as_resident, as_offloaded = layer_compute_ns(run, choice.sequences)
    compute = [as_offloaded[i] if moved else as_resident[i] for i, moved in enumerate(offloaded)]
    rate = run.transfer_bytes_per_ns or 1.0
    transfer = [run.layer_bytes[i] / rate if moved else 0.0 for i, moved in enumerate(offloaded)]
    other = batch.other_ns
    if run.copy_engine:
        step = overlapped_step_ns(compute, transfer, offloaded, min(choice.prefetch + 1, sum(offloaded)), other)
        offload = step - sum(compute) - other
    else:
        other -= sum(run.offloaded) * run.swap_ns  # the run's swap-ins: offloading's, not the model's
        offload = sum(transfer) + 2 * run.swap_ns * sum(offloaded)
    return StepTime(sum(compute), offload, other, batch.gap_ns, choice.sequences)


def overlapped_step_ns(compute: Sequence[float], transfer: Sequence[float], offloaded: Sequence[bool], slots: int, other_ns: float) -> float:
    """The steady step time with copies on their own stream (see the module docstring).

    Args:
        compute: per layer, its forward.
        transfer: per layer, its copy (used where `offloaded`).
        offloaded: per layer, whether it is copied in each step.
        slots: device slots the copies take in turn (min(prefetch + 1, offloaded layers)).
        other_ns: the step's work outside the layers, on the compute stream after the last layer.
    """
    copy_free = 0.0  # when the copy stream is next free
    clock = 0.0  # when the compute stream is next free
    freed: list[float] = []  # per copy issued, when the compute that read its slot ended
    step_ends: list[float] = []
    for _ in range(_SIMULATED_STEPS):
        for index, ns in enumerate(compute):
            if offloaded[index]:
                slot_free = freed[-slots] if len(freed) >= slots else 0.0
                copy_free = max(copy_free, slot_free) + transfer[index]
                clock = max(clock, copy_free)
            clock += ns
            if offloaded[index]:
                freed.append(clock)
        clock += other_ns
        step_ends.append(clock)
    return step_ends[-1] - step_ends[-2]
