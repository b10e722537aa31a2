"""The hot-path half of tracing: a `Timeline` that only collects and hands over.

Per step it appends the offloader's records to a list and, at the step's end, passes the list to
the telemetry thread in one bounded, non-blocking put. Spans are made over there. The only work
done here per token is two random ids (so logs written during the token can carry its trace id).
"""

from __future__ import annotations

import contextvars
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


class _OpenGeneration:
    """A generation in progress: what its steps share, and the index its next step takes."""

    __slots__ = ("info", "next_index")

    def __init__(self, info: GenerationInfo) -> None:
        self.info = info
        self.next_index = 0


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

    A step belongs to the generation open in the context that runs it (a context variable, one
    per recorder): generations opened in two threads, or two asyncio tasks, each get their own
    steps, numbered from 0. A step outside any generation is numbered on the recorder.

    Threading: a step's begin and end come from the thread running the forward; `submit` is the
    hand-over to the telemetry thread.
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
        self._open: contextvars.ContextVar[_OpenGeneration | None] = contextvars.ContextVar(f"tracedoffload_generation_{id(self):x}", default=None)
        self._step_generation: _OpenGeneration | None = None  # of the step in progress
        self.current: TokenContext | None = None  # the token being computed
        self._token_index = 0
        self._records: list[LayerRecord] = []
        self._start: Any = None

    def begin_generation(self, generation: GenerationInfo, anchor: Any) -> contextvars.Token:
        """Open `generation` in the calling context; pass the result to `end_generation`."""
        self.anchor = anchor
        self._anchored_at = time.monotonic()
        return self._open.set(_OpenGeneration(generation))

    def end_generation(self, opened: contextvars.Token) -> None:
        try:
            self._open.reset(opened)
        except ValueError:  # ended from another context than it was opened in
            self._open.set(None)
        self.clear_current()

    def clear_current(self) -> None:
        """No token is being computed (the generation ended, or tracing was detached)."""
        self.current = None
        unbind_token()

    def step_begin(self, marker: Any) -> None:
        self._start = marker
        self._records = []
        self._step_generation = opened = self._open.get()
        generation = opened.info if opened is not None else None
        trace_id = generation.span_context.trace_id if generation and not generation.per_token_traces and generation.span_context else random.getrandbits(128)
        index = opened.next_index if opened is not None else self._token_index
        self.current = TokenContext(trace_id, random.getrandbits(64), index)
        bind_token(self.current.trace_id, self.current.span_id)  # log lines of this context carry it

    def layer(self, record: LayerRecord) -> None:
        self._records.append(record)

    def step_end(self, marker: Any) -> None:
        current = self.current
        if current is None:  # a step_end without its begin (hooks attached mid-forward)
            return
        memory = self._quiet_point() if self._quiet_point is not None else None
        opened = self._step_generation
        self._submit(
            StepPayload(opened.info if opened else None, current.token_index, current.trace_id, current.span_id, self.anchor, self._start, marker, self._records, memory)
        )
        self._records = []
        if opened is not None:
            opened.next_index += 1
        else:
            self._token_index += 1
        # After the hand-over, so every marker of a step is read against one anchor taken before it.
        if self._reanchor is not None and time.monotonic() - self._anchored_at >= REANCHOR_EVERY_S:
            self.anchor = self._reanchor()
            self._anchored_at = time.monotonic()
