"""Each generation's side of the step model, kept on the telemetry thread.

While a generation runs, every step that served it is noted here: the step's trace id becomes an
event on the generation's span (so from a slow request a tracing UI leads to the forwards that
served it; each step links back), and the end of its first generated token gives its time to
first token. When the generation ends, its span is built, already finished, with those events,
and its figures (duration, time to first token, time per output token) go to the listeners.
"""

from __future__ import annotations

import collections
import random
from typing import Any, NamedTuple

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, TraceFlags

from tracedoffload import names
from tracedoffload.tracing.recorder import GenerationEnd, GenerationInfo, StepPayload

# Step events on one generation span, at most (the rest are counted in `generation.steps`).
MAX_STEP_EVENTS = 1024
# Generations whose end never arrived (dropped with a full queue) are forgotten past this many.
MAX_OPEN = 65536
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class GenerationResult(NamedTuple):
    """One finished generation's figures, as the metrics record them."""

    generation_id: str
    span_context: SpanContext | None
    duration_s: float
    time_to_first_token_s: float | None  # None: it generated nothing
    time_per_output_token_s: float | None  # None: fewer than two output tokens
    output_tokens: int
    finish_reason: str


class _Progress:
    __slots__ = ("events", "steps", "first_token_ns")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.steps = 0
        self.first_token_ns: int | None = None


def new_span_context(parent: SpanContext | None) -> SpanContext:
    """A generation span's own context: in its parent's trace, or the root of a new one."""
    if parent is not None and parent.is_valid:  # the caller's trace, and its tracestate with it
        return SpanContext(parent.trace_id, random.getrandbits(64), is_remote=False, trace_flags=_SAMPLED, trace_state=parent.trace_state)
    return SpanContext(random.getrandbits(128), random.getrandbits(64), is_remote=False, trace_flags=_SAMPLED)


class GenerationLedger:
    """Notes steps per generation and builds each generation's span at its end.

    Args:
        step_events: put a step event on the generation span (off when step spans are not
            exported: the event would point at a trace that does not exist).
    """

    def __init__(self, resource: Resource, scope: InstrumentationScope, step_events: bool = True) -> None:
        self.resource = resource
        self.scope = scope
        self.step_events = step_events
        self._open: collections.OrderedDict[str, _Progress] = collections.OrderedDict()

    def on_step(self, payload: StepPayload, end_ns: int) -> None:
        attributes = None  # one dict for every generation this step served
        for sequence in payload.sequences:
            progress = self._progress(sequence.generation.generation_id)
            progress.steps += 1
            if progress.first_token_ns is None and sequence.generated > 0:
                progress.first_token_ns = end_ns
            if self.step_events and len(progress.events) < MAX_STEP_EVENTS:
                if attributes is None:
                    # Only the way to the step: its phase, position and tokens are on the step span.
                    attributes = {names.EVENT_STEP_TRACE_ID: f"{payload.trace_id:032x}", names.EVENT_STEP_SPAN_ID: f"{payload.span_id:016x}"}
                progress.events.append(Event(names.EVENT_STEP, attributes, timestamp=end_ns))

    def on_end(self, end: GenerationEnd, export_span: bool) -> tuple[ReadableSpan | None, GenerationResult]:
        info: GenerationInfo = end.generation
        progress = self._open.pop(info.generation_id, None) or _Progress()
        ttft_ns = progress.first_token_ns - info.start_ns if progress.first_token_ns is not None else None
        per_token = None
        if progress.first_token_ns is not None and end.output_tokens > 1:
            per_token = max(0, end.end_ns - progress.first_token_ns) / (end.output_tokens - 1) / 1e9
        result = GenerationResult(
            info.generation_id,
            info.span_context,
            max(0, end.end_ns - info.start_ns) / 1e9,
            ttft_ns / 1e9 if ttft_ns is not None else None,
            per_token,
            end.output_tokens,
            end.finish_reason,
        )
        if not export_span or info.span_context is None:
            return None, result
        attributes: dict[str, Any] = {
            **end.attributes,
            names.GENERATION_ID: info.generation_id,
            names.GEN_AI_USAGE_OUTPUT_TOKENS: end.output_tokens,
            names.GEN_AI_RESPONSE_FINISH_REASONS: (end.finish_reason,),
            names.GENERATION_STEPS: progress.steps,
        }
        if ttft_ns is not None:
            attributes[names.GENERATION_TTFT_NS] = ttft_ns
        if per_token is not None:
            attributes[names.GENERATION_TPOT_NS] = round(per_token * 1e9)
        model = attributes.get(names.GEN_AI_REQUEST_MODEL, "")
        span = ReadableSpan(
            name=f"{attributes.get(names.GEN_AI_OPERATION_NAME, names.GEN_AI_OPERATION)} {model}".rstrip(),
            context=info.span_context,
            parent=end.parent,
            kind=end.kind,
            resource=self.resource,
            attributes=attributes,
            events=tuple(progress.events),
            start_time=info.start_ns,
            end_time=max(end.end_ns, info.start_ns),
            instrumentation_scope=self.scope,
        )
        return span, result

    def _progress(self, generation_id: str) -> _Progress:
        progress = self._open.get(generation_id)
        if progress is None:
            progress = self._open[generation_id] = _Progress()
            if len(self._open) > MAX_OPEN:
                self._open.popitem(last=False)
        return progress
