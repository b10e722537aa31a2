"""Turning one step's records into its spans, on the telemetry thread.

The step's trace: a root `step` span (one forward pass; it names the sequences it served and links
to their generations' spans) with a child per layer transfer, compute and release, each carrying explicit start and end times taken from the device (CUDA
events) or the host clock, never from when Python asked for the work. Spans are the SDK's own
`ReadableSpan`s, built directly: going through `Tracer.start_span` would cost about six times as
much per span, and these spans are already finished when they are made.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable
from typing import Any, NamedTuple

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, TraceFlags

from tracedoffload import names
from tracedoffload.timeline import COMPUTE, DRAFT, RELEASE, TRANSFER
from tracedoffload.tracing.recorder import StepPayload, StepSequence

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_LAYER_SPAN_NAMES = {TRANSFER: names.SPAN_TRANSFER, COMPUTE: names.SPAN_COMPUTE, RELEASE: names.SPAN_RELEASE, DRAFT: names.SPAN_DRAFT}


class StepTiming(NamedTuple):
    """A step with every marker resolved to wall-clock ns, and its figures."""

    payload: StepPayload
    start_ns: int
    end_ns: int
    starts: list[int]  # per record of payload.records
    ends: list[int]
    wait_ns: dict[int, int]  # per record index of an offloaded compute: time it waited for its copy
    overlap_ns: dict[int, int]  # per record index of a transfer: time it ran beside a compute
    sums: dict[str, int]  # the STEP_* totals
    layers: dict[str, list[int]]  # the STEP_LAYERS_* arrays, indexed by layer index

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


class StepTimer:
    """Resolves markers and derives waits and overlaps. Keeps the last copy end per layer, since a
    layer's copy may be issued in the step before the one that computes it (wrap-around prefetch).
    Used from the telemetry thread only; runs once per step, so it is written as one flat pass.

    Args:
        resolve: `clock.resolve(anchor, marker) -> wall ns`.
        num_layers: length of the per-layer arrays.
        host_clock: markers are host-clock ns and the anchor an offset (skips a call per marker).
    """

    def __init__(self, resolve: Callable[[Any, Any], int], num_layers: int, host_clock: bool = False) -> None:
        self._resolve = resolve
        self._num_layers = num_layers
        self._host_clock = host_clock
        self._last_copy: dict[int, tuple[int, int]] = {}  # layer -> (start, end) of its latest copy

    def time(self, payload: StepPayload) -> StepTiming:
        records = payload.records
        anchor = payload.anchor
        if self._host_clock:
            starts = [r.start + anchor for r in records]
            ends = [r.end + anchor for r in records]
            start_ns, end_ns = payload.start + anchor, payload.end + anchor
        else:
            resolve = self._resolve
            starts = [resolve(anchor, r.start) for r in records]
            ends = [resolve(anchor, r.end) for r in records]
            start_ns, end_ns = resolve(anchor, payload.start), resolve(anchor, payload.end)
        n = max(self._num_layers, 1 + max((r.layer_index for r in records), default=-1))
        compute, transfer, release, wait, overlap, nbytes = ([0] * n for _ in range(6))
        compute_positions = [i for i, r in enumerate(records) if r.kind == COMPUTE]  # in order, one at a time
        compute_starts = [starts[i] for i in compute_positions]
        compute_ends = [ends[i] for i in compute_positions]
        wait_ns: dict[int, int] = {}
        overlap_ns: dict[int, int] = {}
        last_copy = self._last_copy
        previous_compute_end = start_ns
        draft_ns = drafts = 0
        for position, record in enumerate(records):
            layer = record.layer_index
            begin, finish = starts[position], ends[position]
            kind = record.kind
            if kind == COMPUTE:
                compute[layer] += finish - begin
                if record.slot >= 0:
                    copy_start, copy_end = last_copy.get(layer, (previous_compute_end, previous_compute_end))
                    # The compute waited from when it could have run (the previous compute's end, or
                    # this copy's start if the copy was only issued later) until its copy landed.
                    waited = max(0, min(copy_end, begin) - max(previous_compute_end, copy_start))
                    wait_ns[position] = waited
                    wait[layer] += waited
                previous_compute_end = finish
            elif kind == TRANSFER:
                last_copy[layer] = (begin, finish)
                hidden = _overlap(begin, finish, compute_starts, compute_ends)
                overlap_ns[position] = hidden
                transfer[layer] += finish - begin
                overlap[layer] += hidden
                nbytes[layer] += record.nbytes
            elif kind == RELEASE:
                release[layer] += finish - begin
            else:  # a draft model's forward, before the layers
                draft_ns += finish - begin
                drafts += 1
                previous_compute_end = finish
        layers = {
            names.STEP_LAYERS_COMPUTE_NS: compute,
            names.STEP_LAYERS_TRANSFER_NS: transfer,
            names.STEP_LAYERS_RELEASE_NS: release,
            names.STEP_LAYERS_WAIT_NS: wait,
            names.STEP_LAYERS_OVERLAP_NS: overlap,
            names.STEP_LAYERS_TRANSFER_BYTES: nbytes,
        }
        sums = {
            names.STEP_COMPUTE_NS: sum(compute),
            names.STEP_TRANSFER_NS: sum(transfer),
            names.STEP_RELEASE_NS: sum(release),
            names.STEP_WAIT_NS: sum(wait),
            names.STEP_OVERLAP_NS: sum(overlap),
            names.STEP_TRANSFER_BYTES: sum(nbytes),
            names.STEP_TRANSFERS: len(overlap_ns),
            names.STEP_PREFETCHED: sum(1 for r in records if r.kind == TRANSFER and r.prefetched),
        }
        if drafts:
            sums[names.STEP_DRAFT_NS] = draft_ns
            sums[names.STEP_DRAFT_FORWARDS] = drafts
        return StepTiming(payload, start_ns, end_ns, starts, ends, wait_ns, overlap_ns, sums, layers)


def _overlap(start: int, end: int, compute_starts: list[int], compute_ends: list[int]) -> int:
    """Time within [start, end] covered by the (sorted, disjoint) compute intervals."""
    covered = 0
    first = bisect.bisect_right(compute_ends, start)
    for index in range(first, len(compute_starts)):
        if compute_starts[index] >= end:
            break
        covered += min(end, compute_ends[index]) - max(start, compute_starts[index])
    return covered


# Links from a step to the generations it served, at most this many (a backend caps them too:
# OTEL_SPAN_LINK_COUNT_LIMIT is 128 by default); `step.generations` keeps the full count.
MAX_STEP_LINKS = 32


def step_phase(sequences: tuple[StepSequence, ...]) -> str:
    """The step's phase: its sequences' one phase, or `mixed`."""
    if not sequences:
        return names.PHASE_DECODE
    first = sequences[0].phase
    return first if all(s.phase == first for s in sequences) else names.PHASE_MIXED


class SpanFactory:
    """Builds `ReadableSpan`s for one step. Used from the telemetry thread only."""

    def __init__(self, resource: Resource, scope: InstrumentationScope, copy_stream: str, offload_attributes: dict[str, Any]) -> None:
        self.resource = resource
        self.scope = scope
        self.copy_stream = copy_stream
        self.offload_attributes = offload_attributes

    def step_span(self, timing: StepTiming, sampled_by: str | None, events: tuple[Event, ...] = (), extra: dict[str, Any] | None = None) -> ReadableSpan:
        payload = timing.payload
        sequences = payload.sequences
        parent = None
        links: tuple[Link, ...] = ()
        if len(sequences) == 1:  # batch 1: the common case, kept flat (this runs every step)
            only = sequences[0]
            generation = only.generation
            per_sequence: dict[str, Any] = {
                names.STEP_PHASE: only.phase,
                names.STEP_SEQUENCES: 1,
                names.STEP_GENERATIONS: 1,
                names.STEP_TOKENS: only.tokens,
                names.STEP_GENERATED_TOKENS: only.generated,
                names.GENERATION_ID: generation.generation_id,
                names.STEP_POSITION: only.position,
            }
            if only.drafted:
                per_sequence[names.STEP_DRAFTED_TOKENS] = only.drafted
                if only.accepted is not None:
                    per_sequence[names.STEP_ACCEPTED_TOKENS] = only.accepted
            if generation.span_context is not None:
                if generation.per_step_traces:
                    links = (Link(generation.span_context),)
                else:
                    parent = generation.span_context  # one trace per generation: its steps are its children
        else:
            generations = {s.generation.generation_id: s.generation for s in sequences}
            per_sequence = {
                names.STEP_PHASE: step_phase(sequences),
                names.STEP_SEQUENCES: len(sequences),
                names.STEP_GENERATIONS: len(generations),
                names.STEP_TOKENS: sum(s.tokens for s in sequences),
                names.STEP_GENERATED_TOKENS: sum(s.generated for s in sequences),
            }
            if sequences:
                per_sequence[names.STEP_SEQUENCE_GENERATION_IDS] = [s.generation.generation_id for s in sequences]
                per_sequence[names.STEP_SEQUENCE_POSITIONS] = [s.position for s in sequences]
                per_sequence[names.STEP_SEQUENCE_PHASES] = [s.phase for s in sequences]
                per_sequence[names.STEP_SEQUENCE_TOKENS] = [s.tokens for s in sequences]
            links = tuple(Link(g.span_context) for g in list(generations.values())[:MAX_STEP_LINKS] if g.span_context is not None)
        attributes: dict[str, Any] = {
            names.STEP_INDEX: payload.step_index,
            **per_sequence,
            names.STEP_KV_TOKENS: payload.kv_tokens,
            names.STEP_LAYER_DETAIL: sampled_by is not None,
            names.STEP_SAMPLED_BY: sampled_by or "none",
            **self.offload_attributes,
            **timing.sums,
            **timing.layers,
            **(extra or {}),
        }
        context = SpanContext(payload.trace_id, payload.span_id, is_remote=False, trace_flags=_SAMPLED)
        return ReadableSpan(
            name=names.SPAN_STEP,
            context=context,
            parent=parent,
            resource=self.resource,
            attributes=attributes,
            links=links,
            events=events,
            start_time=timing.start_ns,
            end_time=timing.end_ns,
            instrumentation_scope=self.scope,
        )

    def layer_spans(self, timing: StepTiming, step_span: ReadableSpan) -> list[ReadableSpan]:
        # Up to ~60 spans per step at full detail: names, the resource and the scope are hoisted
        # into locals and records unpacked once (measured: a third of this method's time).
        parent = step_span.context
        trace_id = parent.trace_id
        resource, scope, copy_stream = self.resource, self.scope, self.copy_stream
        starts, ends, wait_ns, overlap_ns = timing.starts, timing.ends, timing.wait_ns, timing.overlap_ns
        index_key, bytes_key, slot_key = names.LAYER_INDEX, names.LAYER_BYTES, names.LAYER_SLOT
        span_names, getrandbits = _LAYER_SPAN_NAMES, random.getrandbits
        spans = []
        for n, (kind, layer, _start, _end, nbytes, slot, prefetched) in enumerate(timing.payload.records):
            start_ns, end_ns = starts[n], ends[n]
            # Only what varies: stream on transfers (computes and releases are always on the
            # compute stream), `offloaded` on computes (transfers and releases imply it).
            if kind == TRANSFER:
                nanoseconds = end_ns - start_ns
                attributes: dict[str, Any] = {
                    index_key: layer,
                    bytes_key: nbytes,
                    names.LAYER_GBPS: round(nbytes / nanoseconds, 3) if nanoseconds > 0 else 0.0,  # bytes/ns = GB/s
                    names.LAYER_STREAM: copy_stream,
                    slot_key: slot,
                    names.LAYER_PREFETCHED: prefetched,
                    names.LAYER_OVERLAP_NS: overlap_ns.get(n, 0),
                }
            elif kind == COMPUTE:
                if slot >= 0:
                    attributes = {index_key: layer, names.LAYER_OFFLOADED: True, slot_key: slot, names.LAYER_WAIT_NS: wait_ns.get(n, 0)}
                else:
                    attributes = {index_key: layer, names.LAYER_OFFLOADED: False}
            elif kind == RELEASE:
                attributes = {index_key: layer, bytes_key: nbytes, slot_key: slot}
            else:
                attributes = {}
            spans.append(
                ReadableSpan(
                    span_names[kind],
                    SpanContext(trace_id, getrandbits(64), False, _SAMPLED),
                    parent,
                    resource,
                    attributes,
                    start_time=start_ns,
                    end_time=end_ns,
                    instrumentation_scope=scope,
                )
            )
        return spans
