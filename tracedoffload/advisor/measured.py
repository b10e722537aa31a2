"""What a trace measured, per layer, in the terms the time model (`model.py`) needs.

Everything comes from the step spans' per-layer arrays and the generation span's model sizes
(`tracedoffload.names`), over the decode steps only: a prefill's compute grows with its prompt and
says nothing about the time per generated token.

Each figure is a mean over the same typical steps: per batch size, the middle half of its decode
steps by period (start to the next step's start). Another process on the host slows some steps
down by several times; dropping the slowest and fastest quarter keeps those out, and taking every
figure from the same steps keeps them adding up: the compute, copies, swaps, the rest of the step
and the gap of those steps sum to their mean period, which the model then reproduces exactly for
the run's own configuration on a CPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tracedoffload import names
from tracedoffload._exceptions import TracedOffloadError
from tracedoffload.tracing.spanview import SpanView

# A device whose copies run on their own engine beside compute (CUDA's copy engines); on a CPU
# the same cores copy and compute, one after the other.
COPY_ENGINE_DEVICES = ("cuda",)
_OFFLOAD_KEYS = (names.OFFLOAD_GPU_LAYERS, names.OFFLOAD_CPU_LAYERS, names.OFFLOAD_PREFETCH, names.OFFLOAD_RESIDENCY, names.OFFLOAD_DEVICE)
_LAYER_KEYS = (names.STEP_LAYERS_COMPUTE_NS, names.STEP_LAYERS_TRANSFER_NS, names.STEP_LAYERS_RELEASE_NS, names.STEP_LAYERS_WAIT_NS, names.STEP_LAYERS_TRANSFER_BYTES)


class TraceError(TracedOffloadError):
    """The trace cannot be advised on; the message says what it lacks and how to get it."""


@dataclasses.dataclass(frozen=True)
class BatchFigures:
    """The typical decode steps that served `sequences` sequences at once, as means over them.

    Attributes:
        sequences: sequences per step (1 for `run`; `serve` batches several).
        steps: how many typical decode steps the figures are the mean of.
        compute_ns: per layer, its forward's time.
        other_ns: the step's time outside the layers' spans: embeddings, final norm and lm_head,
            the hooks' own work, and (with a copy engine) nothing that waited for a copy.
        gap_ns: from a step's end to the next step's start (sampling, the generation loop).
        period_ns: from a step's start to the next one's: the measured time per step.
        kv_tokens: the most KV tokens held after a decode step of this size (any, not only the
            typical ones), over every live sequence.
    """

    sequences: int
    steps: int
    compute_ns: tuple[float, ...]
    other_ns: float
    gap_ns: float
    period_ns: float
    kv_tokens: int

    @property
    def ms_per_token(self) -> float:
        return self.period_ns / self.sequences / 1e6


@dataclasses.dataclass(frozen=True)
class MeasuredRun:
    """One run's offload configuration, the model's sizes and the measured figures.

    Attributes:
        device: the compute device (`cpu`, `cuda:0`).
        gpu_layers, prefetch, residency: the run's offload configuration.
        offloaded: per layer, whether the run offloaded it.
        layer_bytes, base_bytes, kv_bytes_per_token, activation_bytes_per_token, logits_bytes:
            the planner's sizes, from the generation span.
        transfer_bytes_per_ns: the copies' measured rate (bytes/ns = GB/s); None when the run
            offloaded nothing.
        swap_ns: per offloaded layer, the release's pointer swap (a layer's swap-in before its
            forward is the same work and is in no span).
        largest_forward_tokens: the most tokens one forward processed (a prompt's prefill).
        batches: per batch size, ascending.
    """

    device: str
    gpu_layers: int
    prefetch: int
    residency: str
    offloaded: tuple[bool, ...]
    layer_bytes: tuple[int, ...]
    base_bytes: int
    kv_bytes_per_token: int
    activation_bytes_per_token: int
    logits_bytes: int
    transfer_bytes_per_ns: float | None
    swap_ns: float
    largest_forward_tokens: int
    batches: tuple[BatchFigures, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def copy_engine(self) -> bool:
        """Copies overlap compute (a CUDA device's copy engine); False on a CPU."""
        return has_copy_engine(self.device)

    def batch(self, sequences: int) -> BatchFigures:
        """The figures of the steps that served `sequences` sequences.

        Raises:
            KeyError: the run has no decode steps of that size.
        """
        for batch in self.batches:
            if batch.sequences == sequences:
                return batch
        raise KeyError(f"no decode steps of {sequences} sequences: the run measured {[b.sequences for b in self.batches]}")


def has_copy_engine(device: str) -> bool:
    """Whether copies to `device` run beside its compute (CUDA) or on the same cores (a CPU)."""
    return device.split(":")[0] in COPY_ENGINE_DEVICES


def measured_run(spans: Iterable[SpanView]) -> MeasuredRun:
    """Extract a `MeasuredRun` from a trace's spans (`read_otlp_jsonl`).

    Raises:
        TraceError: no step spans, steps without per-layer figures or offload configuration,
            several configurations in one file, no model sizes, or too few decode steps.
    """
    steps: list[SpanView] = []
    sizes: Mapping[str, Any] | None = None
    for span in spans:
        if span.name == names.SPAN_STEP:
            steps.append(span)
        elif sizes is None and names.MODEL_LAYER_BYTES in span.attributes:
            sizes = span.attributes
    if not steps:
        raise TraceError("holds no step spans: advice needs a trace written at --trace-level token or layer")
    config = _one_configuration(steps)
    if sizes is None:
        raise TraceError(f"has no {names.MODEL_LAYER_BYTES} (the model's sizes, on its generation spans): write it again with this version's `tracedoffload run --trace-file`")
    layer_bytes = tuple(_int_array(sizes, names.MODEL_LAYER_BYTES))
    decode = sorted((s for s in steps if s.attributes.get(names.STEP_PHASE) == names.PHASE_DECODE), key=lambda s: s.start_ns)
    for step in decode:
        for key in _LAYER_KEYS:
            if len(_int_array(step.attributes, key)) != len(layer_bytes):
                raise TraceError(f"step {step.attributes.get(names.STEP_INDEX)} has no per-layer figures {key} for the {len(layer_bytes)} layers")
    copy_engine = has_copy_engine(str(config[names.OFFLOAD_DEVICE]))
    groups = _typical_pairs(decode)
    if not groups:
        raise TraceError("has no two consecutive decode steps: the time per token needs a run that generated at least 3 tokens")
    typical = [step for pairs in groups.values() for step, _ in pairs]
    offloaded = _offloaded_layers(decode, len(layer_bytes))
    if sum(offloaded) != config[names.OFFLOAD_CPU_LAYERS]:
        raise TraceError(f"its decode steps copied {sum(offloaded)} layers but say {names.OFFLOAD_CPU_LAYERS}={config[names.OFFLOAD_CPU_LAYERS]}")
    return MeasuredRun(
        device=str(config[names.OFFLOAD_DEVICE]),
        gpu_layers=int(config[names.OFFLOAD_GPU_LAYERS]),
        prefetch=int(config[names.OFFLOAD_PREFETCH]),
        residency=str(config[names.OFFLOAD_RESIDENCY]),
        offloaded=offloaded,
        layer_bytes=layer_bytes,
        base_bytes=_int(sizes, names.MODEL_BASE_BYTES),
        kv_bytes_per_token=_int(sizes, names.MODEL_KV_BYTES_PER_TOKEN),
        activation_bytes_per_token=_int(sizes, names.MODEL_ACTIVATION_BYTES_PER_TOKEN),
        logits_bytes=_int(sizes, names.MODEL_LOGITS_BYTES),
        transfer_bytes_per_ns=_transfer_rate(typical),
        swap_ns=_swap_ns(typical, sum(offloaded)),
        largest_forward_tokens=max(int(s.attributes.get(names.STEP_TOKENS, 1)) for s in steps),
        batches=tuple(_batch_figures(sequences, pairs, _most_kv_tokens(decode, sequences), copy_engine) for sequences, pairs in sorted(groups.items())),
    )


def _one_configuration(steps: Sequence[SpanView]) -> dict[str, Any]:
    first = steps[0].attributes
    missing = [key for key in _OFFLOAD_KEYS if key not in first]
    if missing:
        raise TraceError(f"its step spans carry no offload configuration ({missing[0]}): it was not written by an offloaded run")
    config = {key: first[key] for key in _OFFLOAD_KEYS}
    for step in steps:
        other = {key: step.attributes.get(key) for key in _OFFLOAD_KEYS}
        if other != config:
            raise TraceError(f"holds steps of two offload configurations ({config} and {other}): advise on one run's file (written without --append)")
    return config


def _offloaded_layers(decode: Sequence[SpanView], num_layers: int) -> tuple[bool, ...]:
    """A layer is offloaded when a decode step copied it (every decode step copies them all)."""
    moved = [False] * num_layers
    for step in decode:
        for index, nbytes in enumerate(step.attributes[names.STEP_LAYERS_TRANSFER_BYTES]):
            moved[index] = moved[index] or nbytes > 0
    return tuple(moved)


def _typical_pairs(decode: Sequence[SpanView]) -> dict[int, list[tuple[SpanView, SpanView]]]:
    """Per batch size, its typical steps (the middle half by period), each with the step after it:
    a decode step counts when the next step is a decode step of the same size."""
    groups: dict[int, list[tuple[SpanView, SpanView]]] = {}
    for step, following in itertools.pairwise(decode):
        sequences = int(step.attributes.get(names.STEP_SEQUENCES, 1))
        if int(following.attributes.get(names.STEP_SEQUENCES, 1)) == sequences:
            groups.setdefault(sequences, []).append((step, following))
    typical = {}
    for sequences, pairs in groups.items():
        by_period = sorted(pairs, key=lambda pair: pair[1].start_ns - pair[0].start_ns)
        quarter = len(by_period) // 4
        typical[sequences] = by_period[quarter : len(by_period) - quarter]
    return typical


def _most_kv_tokens(decode: Sequence[SpanView], sequences: int) -> int:
    """The most KV tokens held after any decode step of this size (a peak, so over every step)."""
    return max(int(s.attributes.get(names.STEP_KV_TOKENS, 0)) for s in decode if int(s.attributes.get(names.STEP_SEQUENCES, 1)) == sequences)


def _batch_figures(sequences: int, pairs: Sequence[tuple[SpanView, SpanView]], kv_tokens: int, copy_engine: bool) -> BatchFigures:
    steps = [step for step, _ in pairs]
    columns = zip(*(step.attributes[names.STEP_LAYERS_COMPUTE_NS] for step in steps))
    return BatchFigures(
        sequences=sequences,
        steps=len(steps),
        compute_ns=tuple(statistics.fmean(column) for column in columns),
        other_ns=statistics.fmean(_other_ns(step, copy_engine) for step in steps),
        gap_ns=statistics.fmean(following.start_ns - step.end_ns for step, following in pairs),
        period_ns=statistics.fmean(following.start_ns - step.start_ns for step, following in pairs),
        kv_tokens=kv_tokens,
    )


def _other_ns(step: SpanView, copy_engine: bool) -> int:
    """The step's time outside its layers: with a copy engine, a copy costs the step only the time
    a compute waited for it; without one, every copy and pointer swap is on the step's path."""
    attributes = step.attributes
    layers = sum(attributes[names.STEP_LAYERS_COMPUTE_NS])
    if copy_engine:
        layers += sum(attributes[names.STEP_LAYERS_WAIT_NS])
    else:
        layers += sum(attributes[names.STEP_LAYERS_TRANSFER_NS]) + sum(attributes[names.STEP_LAYERS_RELEASE_NS])
    return step.duration_ns - layers


def _transfer_rate(steps: Sequence[SpanView]) -> float | None:
    """Bytes copied over the time the copies took, over `steps` (None: nothing was copied)."""
    nanoseconds = sum(sum(s.attributes[names.STEP_LAYERS_TRANSFER_NS]) for s in steps)
    nbytes = sum(sum(s.attributes[names.STEP_LAYERS_TRANSFER_BYTES]) for s in steps)
    return nbytes / nanoseconds if nanoseconds > 0 and nbytes > 0 else None


def _swap_ns(steps: Sequence[SpanView], num_offloaded: int) -> float:
    """The mean release per offloaded layer, over `steps`."""
    if not num_offloaded or not steps:
        return 0.0
    return statistics.fmean(sum(s.attributes[names.STEP_LAYERS_RELEASE_NS]) / num_offloaded for s in steps)


def _int(attributes: Mapping[str, Any], key: str) -> int:
    value = attributes.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TraceError(f"{key}={value!r}: expected an integer >= 0")
    return value


def _int_array(attributes: Mapping[str, Any], key: str) -> list[int]:
    values = attributes.get(key)
    if values is None:
        return []
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise TraceError(f"{key}={values!r}: expected an array of integers >= 0, one per layer")
    return list(values)
