"""The hot-path half of tracing: a `Timeline` that only collects and hands over.

Per step it appends the offloader's records to a list and, at the step's end, passes the list to
the telemetry thread in one bounded, non-blocking put. Spans are made over there. The only work
done here per token is two random ids (so logs written during the token can carry its trace id).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from opentelemetry.trace import SpanContext

from tracedoffload.logs import bind_token, unbind_token
from tracedoffload.timeline import LayerRecord, Timeline

# How often the clock is re-anchored to wall time, between two steps. CUDA event times are single
# precision milliseconds from the anchor (about 1 µs of resolution 10 s away, 60 µs ten minutes
# away), and the host and wall clocks drift apart; a CUDA anchor costs one synchronize.
REANCHOR_EVERY_S = 10.0


@dataclasses.dataclass(frozen=True)
class GenerationInfo:
    """What every token of one generation shares."""

    generation_id: str
    span_context: SpanContext | None  # the generation span, which each token links to
    per_token_traces: bool  # False: tokens are children of the generation span, in its trace


class StepPayload(NamedTuple):
    """One step (prefill or decode token) as handed to the telemetry thread."""

    generation: GenerationInfo | None
    token_index: int
    trace_id: int
    span_id: int
    anchor: Any
    start: Any
    end: Any
    records: list[LayerRecord]
    memory: Any = None  # a QuietPoint taken at the step end, when a memory monitor is attached


class TokenContext(NamedTuple):
    trace_id: int
    span_id: int
    token_index: int


class TracingTimeline(Timeline):
    """Collects each step's records and submits them with `submit(payload) -> bool` (never blocks).

    Threading: called on the model's thread only; `submit` is the hand-over to another thread.
    """

    def __init__(
        self,
        submit: Callable[[StepPayload], bool],
        anchor: Any,
        offload_attributes: Mapping[str, Any],
        quiet_point: Callable[[], Any] | None = None,
        reanchor: Callable[[], Any] | None = None,
    ) -> None:
        self._submit = submit
        self._quiet_point = quiet_point
        self._reanchor = reanchor
        self.anchor = anchor
        self._anchored_at = time.monotonic()
        self.offload_attributes = dict(offload_attributes)
        self.generation: GenerationInfo | None = None
        self.current: TokenContext | None = None  # the token being computed
        self._token_index = 0
        self._records: list[LayerRecord] = []
        self._start: Any = None

    def begin_generation(self, generation: GenerationInfo, anchor: Any) -> None:
        self.generation = generation
        self.anchor = anchor
        self._anchored_at = time.monotonic()
        self._token_index = 0

    def end_generation(self) -> None:
        self.generation = None
        self.clear_current()

    def clear_current(self) -> None:
        """No token is being computed (the generation ended, or tracing was detached)."""
        self.current = None
        unbind_token()

    def step_begin(self, marker: Any) -> None:
        self._start = marker
        self._records = []
        generation = self.generation
        trace_id = generation.span_context.trace_id if generation and not generation.per_token_traces and generation.span_context else random.getrandbits(128)
        self.current = TokenContext(trace_id, random.getrandbits(64), self._token_index)
        bind_token(self.current.trace_id, self.current.span_id)  # log lines of this context carry it

    def layer(self, record: LayerRecord) -> None:
        self._records.append(record)

    def step_end(self, marker: Any) -> None:
        current = self.current
        if current is None:  # a step_end without its begin (hooks attached mid-forward)
            return
        memory = self._quiet_point() if self._quiet_point is not None else None
        self._submit(
            StepPayload(self.generation, current.token_index, current.trace_id, current.span_id, self.anchor, self._start, marker, self._records, memory)
        )
        self._records = []
        self._token_index += 1
        # After the hand-over, so every marker of a step is read against one anchor taken before it.
        if self._reanchor is not None and time.monotonic() - self._anchored_at >= REANCHOR_EVERY_S:
            self.anchor = self._reanchor()
            self._anchored_at = time.monotonic()
