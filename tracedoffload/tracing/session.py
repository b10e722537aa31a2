"""`TracingSession`: an offloader's timeline wired to OpenTelemetry.

    model thread                     telemetry thread                  exporter threads
    offloader hooks -> recorder --queue--> timings -> spans --+--> stats (every span)
                                                              +--> export fan-out (sampled)
                                                                     -> SpanBatcher -> exporter

The model's thread does O(1) work per token beyond appending records; spans, statistics and
export all happen elsewhere, behind bounded queues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import Event, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Span

from tracedoffload import names
from tracedoffload._checks import check_int, check_number
from tracedoffload._exceptions import ConfigError, TracingStateError
from tracedoffload._version import __version__
from tracedoffload.logs import get_logger
from tracedoffload.offloader import Offloader
from tracedoffload.timeline import NullTimeline
from tracedoffload.tracing import lifecycle
from tracedoffload.tracing.clock import HostClock, clock_for
from tracedoffload.tracing.fanout import ExportFanout, ExportSettings
from tracedoffload.tracing.recorder import GenerationInfo, StepPayload, TracingTimeline
from tracedoffload.tracing.sampling import SamplingPolicy, TailSampler
from tracedoffload.tracing.stats import OffloadStats, StatsSpanProcessor
from tracedoffload.tracing.token_spans import SpanFactory, TokenTimer, TokenTiming
from tracedoffload.tracing.worker import TelemetryWorker

log = get_logger("tracedoffload.tracing")

SCOPE_NAME = "tracedoffload"
TokenListener = Callable[[TokenTiming, OffloadStats], None]


@dataclasses.dataclass
class GenerationHandle:
    """The running generation; set `output_tokens` (and `finish_reason`) before it ends."""

    generation_id: str
    span: Span | None
    output_tokens: int = 0
    finish_reason: str = "length"


class TracingSession:
    """Traces an offloaded model: one trace per token, linked to its generation span.

    Args:
        exporters: where sampled spans go (OTLP, a JSON-lines file, Perfetto, ...); may be empty,
            statistics are kept regardless.
        policy: level of detail and the tail rule for layer spans.
        per_token_traces: True (default): each token is its own trace linked to the generation;
            False: one trace per generation, tokens as children of the generation span.
        resource: the OpenTelemetry resource; by default `default_resource()`: OTEL_SERVICE_NAME
            and OTEL_RESOURCE_ATTRIBUTES, with service.name `tracedoffload` when neither names one.
        max_queued_steps: steps waiting for the telemetry thread before new ones are dropped.
        batch_interval_s: how long the telemetry thread rests between batches of steps (0: wake
            for every token). Token listeners, hence live metrics, lag by up to this much.
        export: bounds of the export path.

    Threading: `attach`, `generation` and `shutdown` from the model's thread; `snapshot` from any.
    Never raises into the model: telemetry failures are logged and counted.

    Processes: a session belongs to the process that made it. Its threads do not survive a fork,
    so in a forked child (a pre-forking server's worker) the inherited session records nothing
    and counts each step it drops; create a session in each worker after the fork (gunicorn's
    `post_fork`), as OpenTelemetry advises for its own SDK.
    """

    def __init__(
        self,
        exporters: Sequence[SpanExporter] = (),
        *,
        policy: SamplingPolicy | None = None,
        per_token_traces: bool = True,
        resource: Resource | None = None,
        max_queued_steps: int = 1024,
        batch_interval_s: float = 0.25,
        export: ExportSettings | None = None,
    ) -> None:
        if isinstance(exporters, (str, bytes)) or not isinstance(exporters, Sequence) or not all(isinstance(e, SpanExporter) for e in exporters):
            raise ConfigError("exporters", exporters, "a list of OpenTelemetry SpanExporter objects (may be empty)")
        check_int("max_queued_steps", max_queued_steps, 1)
        check_number("batch_interval_s", batch_interval_s, 0, 10, "seconds between 0 and 10")
        self.monitor: Any = None  # a MemoryMonitor, set by `monitor_memory`
        self.policy = policy or SamplingPolicy()
        self.per_token_traces = per_token_traces
        self.stats = OffloadStats()
        self._stats_processor = StatsSpanProcessor(self.stats)
        self._fanout = ExportFanout(list(exporters), export or ExportSettings())
        # Our own exit hook rather than the provider's: it drains the telemetry thread first,
        # bounds the wait, and is a no-op in a forked child. Private: only the generation spans
        # go through it (token and layer spans are built as ReadableSpans and handed to the
        # fan-out directly), so a processor added to it would see a fraction of the spans.
        self._provider = TracerProvider(resource=resource or default_resource(), shutdown_on_exit=False)
        self._provider.add_span_processor(self._stats_processor)
        self._provider.add_span_processor(self._fanout)
        self._tracer = self._provider.get_tracer(SCOPE_NAME, __version__)
        self._scope = InstrumentationScope(SCOPE_NAME, __version__)
        self._sampler = TailSampler(self.policy)
        self._listeners: list[TokenListener] = []
        self._offloader: Offloader | None = None
        self._recorder: TracingTimeline | None = None
        self._timer: TokenTimer | None = None
        self._factory: SpanFactory | None = None
        self._clock: Any = None
        self._worker = TelemetryWorker(self._handle_step, max_queued_steps, float(batch_interval_s))
        self._closed = False
        self._pid = os.getpid()
        self._orphaned = False  # set in a forked child, where the threads above do not exist
        self._fork_warned = False
        lifecycle.register(self)

    # -- wiring ---------------------------------------------------------------------------------

    def attach(self, offloader: Offloader) -> None:
        """Start tracing `offloader`'s model (replaces its timeline)."""
        if self._orphaned:
            raise TracingStateError(
                f"this TracingSession was created in process {self._pid} and its threads did not survive the fork "
                f"into process {os.getpid()}: create a TracingSession in this process (after the fork)"
            )
        if self._closed:
            raise TracingStateError("this TracingSession is shut down: create a new one to trace again")
        if not getattr(offloader, "attached", False):
            raise TracingStateError("the offloader is detached: attach tracing to a running Offloader (from offload())")
        if isinstance(offloader.timeline, TracingTimeline) and offloader.timeline is not self._recorder:
            raise TracingStateError("the offloader is already traced by another TracingSession: detach or shut that one down first")
        if self.policy.level == "off":
            return
        streams = offloader.streams
        self._clock = clock_for(offloader.device)
        offload_attributes = offload_span_attributes(offloader)
        self._timer = TokenTimer(self._clock.resolve, len(offloader.layers), host_clock=isinstance(self._clock, HostClock))
        self._factory = SpanFactory(self._provider.resource, self._scope, streams.copy_stream_name, offload_attributes)
        quiet_point = self.monitor.quiet_point if self.monitor is not None else None
        self._recorder = TracingTimeline(self._submit, self._clock.anchor(), offload_attributes, quiet_point, reanchor=self._clock.anchor)
        self._offloader = offloader
        offloader.timeline = self._recorder

    def detach(self) -> None:
        """Stop tracing the attached offloader (its timeline goes back to the no-op one)."""
        if self._offloader is not None:
            self._offloader.timeline = NullTimeline()
            self._offloader = None
        if self._recorder is not None:
            self._recorder.clear_current()

    def monitor_memory(self, monitor: Any) -> None:
        """Add a `tracedoffload.memory.monitor.MemoryMonitor` (before `attach`): memory on every token span,
        leak detection and alerts."""
        if self._recorder is not None:
            raise TracingStateError("monitor_memory() must be called before attach()")
        self.monitor = monitor

    def add_token_listener(self, listener: TokenListener) -> None:
        """Call `listener(timing, stats)` on the telemetry thread after each token is aggregated."""
        self._listeners.append(listener)

    @contextlib.contextmanager
    def generation(self, model_name: str, input_tokens: int, max_new_tokens: int | None = None) -> Iterator[GenerationHandle]:
        """Trace one generation: a `text_completion {model}` span that every token links to."""
        if self._closed:
            raise TracingStateError("this TracingSession is shut down: a generation opened now would record nothing")
        generation_id = secrets.token_hex(8)
        span = None
        if self._orphaned and not self._fork_warned:
            self._fork_warned = True
            log.warning("tracing.forked_session", created_in=self._pid, pid=os.getpid(), hint="create a TracingSession after the fork; steps are dropped")
        if self.policy.level != "off" and not self._orphaned:
            attributes: dict[str, Any] = {
                names.GEN_AI_OPERATION_NAME: names.GEN_AI_OPERATION,
                names.GEN_AI_PROVIDER_NAME: names.PROVIDER,
                names.GEN_AI_REQUEST_MODEL: model_name,
                names.GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
                names.GENERATION_ID: generation_id,
            }
            if max_new_tokens is not None:
                attributes[names.GEN_AI_REQUEST_MAX_TOKENS] = max_new_tokens
            if self._recorder is not None:
                attributes.update(self._recorder.offload_attributes)
            span = self._tracer.start_span(f"{names.GEN_AI_OPERATION} {model_name}", attributes=attributes)
        handle = GenerationHandle(generation_id, span)
        if self.monitor is not None:
            self.monitor.begin_generation()
        recorder, opened = self._recorder, None
        if recorder is not None:
            info = GenerationInfo(generation_id, span.get_span_context() if span else None, self.per_token_traces)
            opened = recorder.begin_generation(info, self._clock.anchor())
        try:
            yield handle
        finally:
            if recorder is not None and opened is not None:
                recorder.end_generation(opened)
            if span is not None:
                span.set_attribute(names.GEN_AI_USAGE_OUTPUT_TOKENS, handle.output_tokens)
                span.set_attribute(names.GEN_AI_RESPONSE_FINISH_REASONS, (handle.finish_reason,))
                span.end()

    # -- results --------------------------------------------------------------------------------

    @property
    def dropped_spans(self) -> int:
        """Spans lost so far: dropped before they were made, or handed to an exporter and not sent."""
        if self._orphaned:  # the exporters' counters live on in the parent
            return self._worker.dropped_spans
        return self._worker.dropped_spans + (self._fanout.lost() if self._closed else self._fanout.failed())

    def snapshot(self) -> dict[str, Any]:
        """The statistics of everything traced so far (see `tracedoffload.tracing.stats`)."""
        snapshot = self.stats.snapshot(dropped_spans=self.dropped_spans)
        snapshot["dropped_steps"] = self._worker.dropped_items
        snapshot["telemetry_errors"] = self._worker.errors
        return snapshot

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait (bounded) until every finished token is aggregated: the statistics are complete.
        Exports may still be in flight (`flush` waits for those too); no network is waited on."""
        if self._orphaned:
            return False
        return self._worker.drain(timeout_s)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait (bounded) until every finished token is aggregated and handed to the exporters."""
        if self._orphaned:
            return False
        return self._worker.drain(timeout_s) and self._fanout.force_flush(int(timeout_s * 1000))

    def shutdown(self, timeout_s: float = 5.0) -> bool:
        """Flush and close the exporters, waiting at most about `timeout_s` in all; True when all
        was sent."""
        if self._closed:
            return True
        deadline = time.monotonic() + timeout_s
        self.detach()
        if self._orphaned:  # nothing of this process was queued; the parent sends its own
            self._closed = True
            return not self._worker.dropped_spans
        drained = self._worker.stop(timeout_s)
        # The fan-out keeps to the deadline itself; on a daemon thread as well, so that an
        # exporter's own shutdown() that hangs cannot hold the caller past the budget either.
        closer = lifecycle.start_daemon(self._fanout.shutdown, max(0.0, deadline - time.monotonic()))
        if closer is not None:
            closer.join(max(0.0, deadline - time.monotonic()))
        self._closed = True
        done = drained and (closer is None or not closer.is_alive())
        lost = self.dropped_spans
        if lost or not done:
            log.warning("tracing.spans_lost", dropped_spans=lost, finished=done)
        return done and not lost

    # -- the telemetry thread -------------------------------------------------------------------

    def _submit(self, payload: StepPayload) -> bool:
        if self._orphaned:
            # Not even a put: the queue's lock may have been held by the parent's telemetry
            # thread at the fork, and would be held here for ever. (Logged by `generation`.)
            self._worker.refuse(spans=len(payload.records) + 1)
            return False
        return self._worker.submit(payload, spans=len(payload.records) + 1)

    def _after_fork_in_child(self) -> None:
        self._orphaned = True
        self._worker.dropped_items = self._worker.dropped_spans = 0  # count this process's own
        self.stats.reset_lock_after_fork()

    def _handle_step(self, payload: StepPayload) -> None:
        timing = self._timer.time(payload)
        if self._offloader is not None and self._offloader.streams.kind == "cuda":
            self._offloader.streams.recycle(_markers(payload))
        level = self.policy.level
        sampled_by = self._sampler.decide(payload.token_index, timing.duration_ns) if level == "layer" else None
        slow = sampled_by in ("slow", "relative")
        events: tuple[Event, ...] = (Event(names.EVENT_SLOW_TOKEN, {"reason": sampled_by}, timestamp=timing.end_ns),) if slow else ()
        memory_attributes: dict[str, Any] = {}
        if self.monitor is not None:
            memory_attributes, memory_events = self.monitor.on_token(payload.token_index, payload.memory, payload.trace_id)
            events += memory_events
        token_span = self._factory.token_span(timing, sampled_by, events, memory_attributes)
        if slow:
            log.warning(
                "token.slow",
                ms=round(timing.duration_ns / 1e6, 3),
                token_index=payload.token_index,
                reason=sampled_by,
                trace_id=f"{payload.trace_id:032x}",
                span_id=f"{payload.span_id:016x}",
            )
        # Layer spans are made only for tokens whose detail leaves the process, and go to the
        # exporters only: the statistics read the token span, which carries every layer's figures.
        layer_spans = self._factory.layer_spans(timing, token_span) if sampled_by is not None else []
        self._stats_processor.on_end(token_span)
        if level in ("token", "layer"):
            layer_spans.append(token_span)
            self._fanout.export_token(layer_spans)
        for listener in self._listeners:
            listener(timing, self.stats)


def default_resource() -> Resource:
    """The SDK's resource from the environment, named `tracedoffload` unless the environment names
    the service (the SDK's own fallback, `unknown_service:python3`, is not searchable)."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: names.SERVICE_NAME_DEFAULT}))
    return resource


def offload_span_attributes(offloader: Offloader) -> dict[str, Any]:
    """The offload configuration as span attributes (on the generation and on every token)."""
    return {
        names.OFFLOAD_GPU_LAYERS: len(offloader.resident_indices),
        names.OFFLOAD_CPU_LAYERS: len(offloader.offloaded_indices),
        names.OFFLOAD_PREFETCH: offloader.config.prefetch,
        names.OFFLOAD_RESIDENCY: offloader.config.residency,
        names.OFFLOAD_PINNED: offloader.pinned,
        names.OFFLOAD_DEVICE: str(offloader.device),
        names.OFFLOAD_OFFLOADED_BYTES: offloader.offloaded_bytes,
        names.OFFLOAD_DEVICE_POOL_BYTES: offloader.device_pool_bytes,
        names.OFFLOAD_PINNED_BYTES: offloader.pinned_bytes,
    }


def _markers(payload: StepPayload) -> list[Any]:
    seen: dict[int, Any] = {id(payload.start): payload.start, id(payload.end): payload.end}
    for record in payload.records:
        seen[id(record.start)] = record.start
        seen[id(record.end)] = record.end
    return list(seen.values())
