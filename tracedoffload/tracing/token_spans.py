"""Turning one step's records into the spans of one token, on the telemetry thread.

The token's trace: a root `token` span (linked to its generation) with a child per layer transfer,
compute and release, each carrying explicit start and end times taken from the device (CUDA
events) or the host clock, never from when Python asked for the work. Spans are the SDK's own
`ReadableSpan`s, built directly: going through `Tracer.start_span` would cost about six times as
much per span, and these spans are already finished when they are made.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, NamedTuple

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, TraceFlags

from tracedoffload.timeline import COMPUTE, RELEASE, TRANSFER
from tracedoffload.tracing import names
from tracedoffload.tracing.recorder import StepPayload

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_LAYER_SPAN_NAMES = {TRANSFER: names.SPAN_TRANSFER, COMPUTE: names.SPAN_COMPUTE, RELEASE: names.SPAN_RELEASE}


class ResolvedRecord(NamedTuple):
    kind: str
    layer_index: int
    start_ns: int
    end_ns: int
    nbytes: int
    slot: int
    prefetched: bool


class TokenTiming(NamedTuple):
    """A step with every marker resolved to wall-clock ns, and the per-token sums."""

    payload: StepPayload
    start_ns: int
    end_ns: int
    records: list[ResolvedRecord]
    wait_ns: dict[int, int]  # per computed offloaded layer: time it waited for its own copy
    overlap_ns: list[int]  # per record (0 unless transfer): time it ran beside a compute
    sums: dict[str, int]

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


class TokenTimer:
    """Resolves markers and derives waits and overlaps. Keeps the last copy end per layer, since a
    layer's copy may be issued in the step before the one that computes it (wrap-around prefetch)."""

    def __init__(self, resolve: Callable[[Any, Any], int]) -> None:
        self._resolve = resolve
        self._last_copy_end: dict[int, int] = {}

    def time(self, payload: StepPayload) -> TokenTiming:
        resolve, anchor = self._resolve, payload.anchor
        records = [
            ResolvedRecord(r.kind, r.layer_index, resolve(anchor, r.start), resolve(anchor, r.end), r.nbytes, r.slot, r.prefetched)
            for r in payload.records
        ]
        start_ns, end_ns = resolve(anchor, payload.start), resolve(anchor, payload.end)
        computes = sorted((r.start_ns, r.end_ns) for r in records if r.kind == COMPUTE)
        wait_ns: dict[int, int] = {}
        overlap_ns = [0] * len(records)
        sums = dict.fromkeys((names.TOKEN_COMPUTE_NS, names.TOKEN_TRANSFER_NS, names.TOKEN_RELEASE_NS, names.TOKEN_WAIT_NS, names.TOKEN_OVERLAP_NS, names.TOKEN_TRANSFER_BYTES, names.TOKEN_TRANSFERS), 0)
        previous_compute_end = start_ns
        for n, record in enumerate(records):
            duration = record.end_ns - record.start_ns
            if record.kind == TRANSFER:
                self._last_copy_end[record.layer_index] = record.end_ns
                overlap = sum(max(0, min(record.end_ns, c_end) - max(record.start_ns, c_start)) for c_start, c_end in computes)
                overlap_ns[n] = overlap
                sums[names.TOKEN_TRANSFER_NS] += duration
                sums[names.TOKEN_OVERLAP_NS] += overlap
                sums[names.TOKEN_TRANSFER_BYTES] += record.nbytes
                sums[names.TOKEN_TRANSFERS] += 1
            elif record.kind == COMPUTE:
                sums[names.TOKEN_COMPUTE_NS] += duration
                if record.slot >= 0:
                    copy_end = self._last_copy_end.get(record.layer_index, previous_compute_end)
                    # The compute stream sat idle from the previous compute's end until this copy
                    # landed (or until the compute began, if that came first).
                    wait = max(0, min(copy_end, record.start_ns) - previous_compute_end)
                    wait_ns[n] = wait
                    sums[names.TOKEN_WAIT_NS] += wait
                previous_compute_end = record.end_ns
            else:
                sums[names.TOKEN_RELEASE_NS] += duration
        return TokenTiming(payload, start_ns, end_ns, records, wait_ns, overlap_ns, sums)


class SpanFactory:
    """Builds `ReadableSpan`s for one token. Used from the telemetry thread only."""

    def __init__(self, resource: Resource, scope: InstrumentationScope, stream_names: tuple[str, str], offload_attributes: dict[str, Any]) -> None:
        self.resource = resource
        self.scope = scope
        self.copy_stream, self.compute_stream = stream_names
        self.offload_attributes = offload_attributes

    def token_span(self, timing: TokenTiming, sampled_by: str | None, events: tuple[Event, ...] = (), extra: dict[str, Any] | None = None) -> ReadableSpan:
        payload = timing.payload
        generation = payload.generation
        attributes: dict[str, Any] = {
            names.TOKEN_INDEX: payload.token_index,
            names.TOKEN_PHASE: names.PHASE_PREFILL if payload.token_index == 0 else names.PHASE_DECODE,
            names.TOKEN_LAYER_DETAIL: sampled_by is not None,
            names.TOKEN_SAMPLED_BY: sampled_by or "none",
            **self.offload_attributes,
            **timing.sums,
            **(extra or {}),
        }
        parent = None
        links: tuple[Link, ...] = ()
        if generation is not None:
            attributes[names.GENERATION_ID] = generation.generation_id
            if generation.span_context is not None:
                if generation.per_token_traces:
                    links = (Link(generation.span_context),)
                else:
                    parent = generation.span_context
        context = SpanContext(payload.trace_id, payload.span_id, is_remote=False, trace_flags=_SAMPLED)
        return ReadableSpan(
            name=names.SPAN_TOKEN,
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

    def layer_spans(self, timing: TokenTiming, token_span: ReadableSpan) -> list[ReadableSpan]:
        parent = token_span.context
        trace_id = parent.trace_id
        spans = []
        for n, record in enumerate(timing.records):
            attributes: dict[str, Any] = {names.LAYER_INDEX: record.layer_index, names.LAYER_OFFLOADED: record.slot >= 0}
            if record.kind == TRANSFER:
                seconds = (record.end_ns - record.start_ns) / 1e9
                attributes[names.LAYER_BYTES] = record.nbytes
                attributes[names.LAYER_GBPS] = round(record.nbytes / seconds / 1e9, 3) if seconds > 0 else 0.0
                attributes[names.LAYER_STREAM] = self.copy_stream
                attributes[names.LAYER_SLOT] = record.slot
                attributes[names.LAYER_PREFETCHED] = record.prefetched
                attributes[names.LAYER_OVERLAP_NS] = timing.overlap_ns[n]
            else:
                attributes[names.LAYER_STREAM] = self.compute_stream
                if record.slot >= 0:
                    attributes[names.LAYER_SLOT] = record.slot
                if record.kind == COMPUTE and n in timing.wait_ns:
                    attributes[names.LAYER_WAIT_NS] = timing.wait_ns[n]
                if record.kind == RELEASE:
                    attributes[names.LAYER_BYTES] = record.nbytes
            spans.append(
                ReadableSpan(
                    name=_LAYER_SPAN_NAMES[record.kind],
                    context=SpanContext(trace_id, random.getrandbits(64), is_remote=False, trace_flags=_SAMPLED),
                    parent=parent,
                    resource=self.resource,
                    attributes=attributes,
                    start_time=record.start_ns,
                    end_time=record.end_ns,
                    instrumentation_scope=self.scope,
                )
            )
        return spans
