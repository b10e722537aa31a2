"""The telemetry thread's work on each handed-over item: a step, or a generation's end.

    step:  markers -> timing -> step span (+ layer spans when sampled) -> statistics (every step)
                                                                       -> export fan-out (sampled)
                                                                       -> step listeners (metrics, progress)
    end:   the generation's span, with an event per step that served it -> statistics, export,
           generation listeners (request duration, time to first token, time per output token)

Never raises into the caller's thread: this runs on the telemetry thread, whose worker counts and
logs a failed item and goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.trace import Event

from tracedoffload import names
from tracedoffload.logs import get_logger
from tracedoffload.tracing.fanout import ExportFanout
from tracedoffload.tracing.generations import GenerationLedger, GenerationResult
from tracedoffload.tracing.recorder import GenerationEnd, StepPayload
from tracedoffload.tracing.sampling import SamplingPolicy, TailSampler
from tracedoffload.tracing.stats import OffloadStats, StatsSpanProcessor
from tracedoffload.tracing.step_spans import SpanFactory, StepTimer, StepTiming

log = get_logger("tracedoffload.tracing")

StepListener = Callable[[StepTiming, OffloadStats], None]
GenerationListener = Callable[[GenerationResult], None]


class StepPipeline:
    """Turns items into spans, statistics and listener calls. Telemetry thread only.

    `timer`, `factory` and `recycle` are set when a session attaches to an offloader (`bind`);
    generation ends are handled before that too.
    """

    def __init__(self, policy: SamplingPolicy, stats: OffloadStats, fanout: ExportFanout, ledger: GenerationLedger) -> None:
        self.policy = policy
        self.stats = stats
        self._stats_processor = StatsSpanProcessor(stats)
        self._fanout = fanout
        self._ledger = ledger
        self._sampler = TailSampler(policy)
        self.monitor: Any = None
        self.step_listeners: list[StepListener] = []
        self.generation_listeners: list[GenerationListener] = []
        self._timer: StepTimer | None = None
        self._factory: SpanFactory | None = None
        self._recycle: Callable[[list[Any]], None] | None = None

    def bind(self, timer: StepTimer, factory: SpanFactory, recycle: Callable[[list[Any]], None] | None) -> None:
        self._timer, self._factory, self._recycle = timer, factory, recycle

    def handle(self, item: StepPayload | GenerationEnd) -> None:
        if isinstance(item, GenerationEnd):
            self._generation_end(item)
        else:
            self._step(item)

    def _step(self, payload: StepPayload) -> None:
        timing = self._timer.time(payload)
        if self._recycle is not None:
            self._recycle(_markers(payload))
        level = self.policy.level
        # "First": a generation's first steps, at batch 1. A step of a batch counts only among the
        # session's first steps: with requests joining a continuous batch all the time, nearly
        # every step holds some request's first steps, and the rule would export every layer.
        sequences = payload.sequences
        first_tokens = self.policy.first_tokens
        first = sequences[0].step_number < first_tokens if len(sequences) == 1 else payload.step_index < first_tokens
        sampled_by = self._sampler.decide(first, timing.duration_ns) if level == "layer" else None
        slow = sampled_by in names.SLOW_STEP_REASONS
        events: tuple[Event, ...] = (Event(names.EVENT_SLOW_STEP, {"reason": sampled_by}, timestamp=timing.end_ns),) if slow else ()
        memory_attributes: dict[str, Any] = {}
        if self.monitor is not None:
            memory_attributes, memory_events = self.monitor.on_step(payload.step_index, payload.kv_tokens, payload.memory, payload.trace_id)
            events += memory_events
        step_span = self._factory.step_span(timing, sampled_by, events, memory_attributes)
        if slow:
            log.warning(
                "step.slow",
                ms=round(timing.duration_ns / 1e6, 3),
                step_index=payload.step_index,
                sequences=len(payload.sequences),
                reason=sampled_by,
                trace_id=f"{payload.trace_id:032x}",
                span_id=f"{payload.span_id:016x}",
            )
        self._ledger.on_step(payload, timing.end_ns)
        # Layer spans are made only for steps whose detail leaves the process, and go to the
        # exporters only: the statistics read the step span, which carries every layer's figures.
        layer_spans = self._factory.layer_spans(timing, step_span) if sampled_by is not None else []
        self._stats_processor.on_end(step_span)
        if level in ("token", "layer"):
            layer_spans.append(step_span)
            self._fanout.export(layer_spans)
        for listener in self.step_listeners:
            listener(timing, self.stats)

    def _generation_end(self, end: GenerationEnd) -> None:
        span, result = self._ledger.on_end(end, export_span=self.policy.level != "off")
        if span is not None:
            self._stats_processor.on_end(span)
            self._fanout.export((span,))
        for listener in self.generation_listeners:
            listener(result)


def _markers(payload: StepPayload) -> list[Any]:
    seen: dict[int, Any] = {id(payload.start): payload.start, id(payload.end): payload.end}
    for record in payload.records:
        seen[id(record.start)] = record.start
        seen[id(record.end)] = record.end
    return list(seen.values())
