"""The hot-path half of tracing: a `Timeline` that only collects and hands over.

One forward pass is one step. A step serves one or more sequences, each the sequence of one
generation (one request). Per step, on the thread running the model, this collects the offloader's
records and notes which sequences the forward served: their generation, position, phase and token
count. At the step's end it passes all of it to the telemetry thread in one bounded, non-blocking
put; spans are made over there.

Which sequences a step serves comes from one of two places:
- **the context** (`open_in_context`): the generations opened in the context that runs the model,
  in one batch, one per row of the forward's input (a `generate` call, batch 1 or more). Phases are
  inferred: a sequence's first step is its prefill, then one new token per row is a decode and
  several are a verify (speculative decoding's drafted tokens).

Speculative decoding (batch 1, in context): a forward past the prompt's, or a prefill longer than
the prompt, carries drafted tokens, and how many the model kept is known only after it, when the
KV cache is cropped to them. Such a step is held until the next forward of its generation (whose
cache length, `cached`, says how many were kept) or its end (whose output length says), then
handed over with its drafted, accepted and generated tokens, and the generation's KV tally
corrected to the cropped cache.
- **a plan** (`plan_step`): whoever schedules a batch (a continuous-batching engine) says, before
  each forward, which generations it serves and how. A plan is used for the next step only.

KV tokens (what every live sequence holds in its cache) are tallied here, over all live sequences
whatever context opened them: the leak detector judges memory beyond what they account for.
"""

from __future__ import annotations

import contextvars
import dataclasses
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from opentelemetry.trace import SpanContext, SpanKind

from tracedoffload import names
from tracedoffload.logs import bind_token, unbind_token
from tracedoffload.timeline import DRAFT, TRANSFER, LayerRecord, Timeline

MAX_PENDING_DRAFTS = 256  # draft forwards kept for the next step (a draft run with no step after it is bounded)

# How often the clock is re-anchored to wall time, between two steps. CUDA event times are single
# precision milliseconds from the anchor (about 1 µs of resolution 10 s away, 60 µs ten minutes
# away), and the host and wall clocks drift apart; a CUDA anchor costs one synchronize.
REANCHOR_EVERY_S = 10.0


@dataclasses.dataclass(frozen=True)
class GenerationInfo:
    """What every step of one generation shares."""

    generation_id: str
    span_context: SpanContext | None  # the generation span, which its steps link to
    per_step_traces: bool  # False: a step that serves only this generation is a child of its span
    input_tokens: int  # the prompt's length: what its prefill processes
    start_ns: int  # wall clock at its start (for the time to its first token)


class _OpenSequence:
    """A live sequence: where it is, and how many steps and new tokens it has had."""

    __slots__ = ("info", "position", "steps", "generated")

    def __init__(self, info: GenerationInfo) -> None:
        self.info = info
        self.position = 0  # tokens in its KV cache
        self.steps = 0
        self.generated = 0


class StepSequence(NamedTuple):
    """One sequence's part in one step."""

    generation: GenerationInfo
    position: int  # tokens in its cache before this step
    phase: str  # one of names.PHASES
    tokens: int  # tokens of it the forward processed
    generated: int  # new tokens it got from this step (0 for a prefill chunk that is not the last)
    step_number: int  # how many steps served it before this one (0: its first)
    drafted: int = 0  # drafted tokens it verified (speculative decoding)
    accepted: int | None = None  # of those, how many the model kept (None: not known)


class PlannedSequence(NamedTuple):
    """What a scheduler says one sequence does in the next forward (see `plan_step`)."""

    generation_id: str
    phase: str
    tokens: int
    generated: int | None = None  # default: 0 for a prefill chunk, else 1
    position: int | None = None  # default: as tallied here (the tokens it has processed so far)


class StepPayload(NamedTuple):
    """One step (forward pass) as handed to the telemetry thread."""

    step_index: int
    sequences: tuple[StepSequence, ...]
    kv_tokens: int  # held over every live sequence after this step
    trace_id: int
    span_id: int
    anchor: Any
    start: Any
    end: Any
    records: list[LayerRecord]
    memory: Any = None  # a QuietPoint taken at the step end, when a memory monitor is attached
    model_cpu: tuple[int, float] = (0, 0.0)  # (thread id, its CPU seconds so far) of the thread that ran the step


class GenerationEnd(NamedTuple):
    """A generation ended (handed over after its steps, so it is handled after them)."""

    generation: GenerationInfo
    end_ns: int
    output_tokens: int
    finish_reason: str
    attributes: Mapping[str, Any]  # the generation span's, set at its start
    parent: SpanContext | None  # the generation span's parent (a request's span), if any
    kind: SpanKind = SpanKind.INTERNAL  # SERVER for a server's request


class StepContext(NamedTuple):
    trace_id: int
    span_id: int
    step_index: int


class TracingTimeline(Timeline):
    """Collects each step's records and submits them with `submit(item) -> bool` (never blocks).

    Threading: a step's begin and end come from the thread running the forward (one at a time);
    generations open and close from any thread.
    """

    def __init__(
        self,
        submit: Callable[[Any], bool],
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
        self._group: contextvars.ContextVar[tuple[_OpenSequence, ...]] = contextvars.ContextVar(f"tracedoffload_generations_{id(self):x}", default=())
        self._live: dict[str, _OpenSequence] = {}
        self._lock = threading.Lock()  # guards _live and _kv_tokens (generations come and go from any thread)
        self._kv_tokens = 0
        self._plan: tuple[tuple[PlannedSequence, ...], int | None] | None = None
        self._planned_kv: int | None = None
        self._step_sequences: tuple[StepSequence, ...] = ()
        self._step_opened: list[_OpenSequence] = []
        self.current: StepContext | None = None  # the step being computed
        self._step_index = 0
        self._records: list[LayerRecord] = []
        self._start: Any = None
        self._held: tuple[StepPayload, _OpenSequence] | None = None  # a verify step waiting for its outcome
        self._drafts: list[LayerRecord] = []  # draft-model forwards since the last step
        self._is_draft_forward: Callable[[], bool] | None = None  # early exit: which forwards draft
        self._draft_begun: tuple[Any, int] | None = None  # a draft forward in progress: its start, its place in _drafts

    # -- generations (any thread) -------------------------------------------------------------------

    @property
    def live_generations(self) -> int:
        return len(self._live)

    @property
    def kv_tokens(self) -> int:
        return self._kv_tokens

    def open(self, generations: Sequence[GenerationInfo]) -> list[_OpenSequence]:
        """Make generations live (a plan may name them; their KV is tallied until `close`)."""
        opened = [_OpenSequence(info) for info in generations]
        with self._lock:
            for sequence in opened:
                self._live[sequence.info.generation_id] = sequence
        return opened

    def open_in_context(self, generations: Sequence[GenerationInfo]) -> tuple[list[_OpenSequence], contextvars.Token]:
        """Open `generations` as one batch in the calling context: each forward run from it serves them."""
        opened = self.open(generations)
        return opened, self._group.set(tuple(opened))

    def close(self, opened: Sequence[_OpenSequence], context_token: contextvars.Token | None = None, output_tokens: Sequence[int] | None = None) -> None:
        """End generations; `output_tokens`, per generation, settles a verify step still held."""
        held = self._held
        if held is not None and held[1] in opened:
            total = output_tokens[list(opened).index(held[1])] if output_tokens is not None else None
            self._release_held(None, total)
        if context_token is not None:
            try:
                self._group.reset(context_token)
            except ValueError:  # closed from another context than it was opened in
                self._group.set(())
        with self._lock:
            for sequence in opened:
                if self._live.pop(sequence.info.generation_id, None) is not None:
                    self._kv_tokens -= sequence.position
        if context_token is not None:
            self.clear_current()

    def reanchor_now(self, anchor: Any) -> None:
        self.anchor = anchor
        self._anchored_at = time.monotonic()

    def plan_step(self, sequences: Sequence[PlannedSequence], kv_tokens: int | None = None) -> None:
        """Say what the next forward on this model serves (model's thread, just before it).

        Args:
            sequences: per sequence, its generation id (opened with `open`), phase, tokens.
            kv_tokens: tokens held in KV caches after that step, when the scheduler knows better
                than the tally here (a paged cache allocated up front).
        """
        self._plan = (tuple(sequences), kv_tokens)

    def clear_current(self) -> None:
        """No step is being computed (the generation ended, or tracing was detached)."""
        self.current = None
        unbind_token()

    # -- steps (the model's thread) -----------------------------------------------------------------

    def draft(self, record: LayerRecord) -> None:
        """A draft model's forward (model's thread): it goes with the next step, which verifies it."""
        if len(self._drafts) < MAX_PENDING_DRAFTS:
            self._drafts.append(record)

    def draft_forwards_when(self, predicate: Callable[[], bool] | None) -> None:
        """Early-exit self-speculation: forwards of the offloaded model itself for which
        `predicate()` is true are drafts (`draft`), not steps. None: every forward is a step."""
        self._is_draft_forward = predicate

    def step_begin(self, marker: Any, rows: int = 1, length: int = 1, cached: int | None = None) -> None:
        if self._is_draft_forward is not None and self._is_draft_forward():
            self._draft_begun = (marker, len(self._drafts))
            return
        # Drafting is part of making this step's tokens: the step starts at its first draft forward.
        drafts, self._drafts = self._drafts, []
        self._start = drafts[0].start if drafts else marker
        self._records = drafts
        plan, self._plan = self._plan, None
        if self._held is not None:
            # Its generation's next forward says how many drafted tokens the cache kept.
            same = plan is None and self._held[1] in self._group.get()
            self._release_held(cached if same else None, None)
        if plan is not None:
            self._step_opened, self._step_sequences = self._from_plan(plan[0])
        else:
            self._step_opened, self._step_sequences = self._from_context(length)
        single = self._step_sequences[0].generation if len(self._step_sequences) == 1 else None
        if single is not None and not single.per_step_traces and single.span_context is not None:
            trace_id = single.span_context.trace_id
        else:
            trace_id = random.getrandbits(128)
        self.current = StepContext(trace_id, random.getrandbits(64), self._step_index)
        bind_token(trace_id, self.current.span_id)  # log lines of this context carry it
        self._planned_kv = plan[1] if plan is not None else None

    def layer(self, record: LayerRecord) -> None:
        if self._draft_begun is None:
            self._records.append(record)
        elif record.kind == TRANSFER and len(self._drafts) < MAX_PENDING_DRAFTS:
            # A copy issued during a draft forward (a prefetch of the verifying forward's first
            # offloaded layers) is that step's transfer; the draft's layer computes are its span's.
            self._drafts.append(record)

    def step_end(self, marker: Any) -> None:
        if self._draft_begun is not None:
            start, place = self._draft_begun
            self._draft_begun = None
            if len(self._drafts) < MAX_PENDING_DRAFTS:
                self._drafts.insert(place, LayerRecord(DRAFT, -1, start, marker, 0, -1, False))
            return
        current = self.current
        if current is None:  # a step_end without its begin (hooks attached mid-forward)
            return
        memory = self._quiet_point() if self._quiet_point is not None else None
        with self._lock:
            for sequence, step in zip(self._step_opened, self._step_sequences):
                if sequence.info.generation_id in self._live:
                    self._kv_tokens += step.position + step.tokens - sequence.position
                sequence.position = step.position + step.tokens
                sequence.steps += 1
                sequence.generated += step.generated
            kv_tokens = self._kv_tokens if self._planned_kv is None else self._planned_kv
        model_cpu = (threading.get_ident(), time.thread_time())
        payload = StepPayload(current.step_index, self._step_sequences, kv_tokens, current.trace_id, current.span_id, self.anchor, self._start, marker, self._records, memory, model_cpu)
        if len(self._step_sequences) == 1 and self._step_sequences[0].drafted and self._step_opened:
            self._held = (payload, self._step_opened[0])  # handed over once its outcome is known
        else:
            self._submit(payload)
        self._records = []
        self._step_index += 1
        # After the hand-over, so every marker of a step is read against one anchor taken before it.
        if self._reanchor is not None and time.monotonic() - self._anchored_at >= REANCHOR_EVERY_S:
            self.reanchor_now(self._reanchor())

    def _from_context(self, length: int) -> tuple[list[_OpenSequence], tuple[StepSequence, ...]]:
        group = self._group.get()
        if not group:
            return [], ()
        steps = []
        for sequence in group:
            if sequence.steps == 0:
                # The prompt (left-padded in a batch: its own length, not the padded one); alone,
                # whatever the forward holds beyond the prompt was drafted (prompt lookup drafts
                # from the prefill on).
                tokens = sequence.info.input_tokens if len(group) > 1 else length
                phase, drafted = names.PHASE_PREFILL, max(0, tokens - sequence.info.input_tokens)
            else:
                tokens = length
                phase, drafted = (names.PHASE_DECODE, 0) if length == 1 else (names.PHASE_VERIFY, length - 1)
            # Until the outcome is known, a verify is counted as one new token (see _release_held).
            steps.append(StepSequence(sequence.info, sequence.position, phase, tokens, 1, sequence.steps, drafted))
        return list(group), tuple(steps)

    def _release_held(self, cached: int | None, output_tokens: int | None) -> None:
        """Hand the held verify step over, with its outcome: from the cache length of its
        generation's next forward (`cached`), else from the generation's output length, else
        unknown (counted as one new token, accepted None)."""
        (payload, sequence), self._held = self._held, None
        step = payload.sequences[0]
        generated = None
        if cached is not None:
            kept = cached - step.position  # the cache after the crop: what the step kept
            generated = kept - step.generation.input_tokens + 1 if step.phase == names.PHASE_PREFILL else kept
        elif output_tokens is not None:
            generated = output_tokens - (sequence.generated - step.generated)
        if generated is None:
            self._submit(payload)
            return
        generated = min(max(generated, 1), step.drafted + 1)
        discarded = step.drafted + 1 - generated  # drafted tokens the cache dropped
        with self._lock:
            sequence.generated += generated - step.generated
            sequence.position -= discarded
            if sequence.info.generation_id in self._live:
                self._kv_tokens -= discarded
        settled = step._replace(generated=generated, accepted=generated - 1)
        self._submit(payload._replace(sequences=(settled,), kv_tokens=payload.kv_tokens - discarded))

    def _from_plan(self, planned: tuple[PlannedSequence, ...]) -> tuple[list[_OpenSequence], tuple[StepSequence, ...]]:
        opened, steps = [], []
        live = self._live
        for entry in planned:
            sequence = live.get(entry.generation_id)
            if sequence is None:  # ended already, or never opened: nothing to attribute it to
                continue
            generated = entry.generated if entry.generated is not None else (0 if entry.phase == names.PHASE_PREFILL_CHUNK else 1)
            position = entry.position if entry.position is not None else sequence.position
            opened.append(sequence)
            steps.append(StepSequence(sequence.info, position, entry.phase, entry.tokens, generated, sequence.steps))
        return opened, tuple(steps)
