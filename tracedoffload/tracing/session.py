"""`TracingSession`: an offloader's steps and generations wired to OpenTelemetry.

    model thread                        telemetry thread (pipeline.py)       exporter threads
    offloader hooks -> recorder --queue--> timing -> spans --+--> stats (every span)
    generation ends ------------/                            +--> export fan-out (sampled)
                                                                   -> SpanBatcher -> exporter

One forward pass is one step (a `step` span), serving one sequence or many; a generation (one
request) is a `text_completion {model}` span. Each step links to the generations it served and
each generation carries an event per step, so a tracing UI goes both ways. The model's thread
does O(1) work per step beyond appending records; spans, statistics and export all happen
elsewhere, behind bounded queues.
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
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind

from tracedoffload import names
from tracedoffload._checks import check_int, check_number
from tracedoffload._exceptions import ConfigError, TracingStateError
from tracedoffload._version import __version__
from tracedoffload.logs import get_logger
from tracedoffload.offloader import Offloader
from tracedoffload.timeline import DRAFT, LayerRecord, NullTimeline
from tracedoffload.tracing import lifecycle
from tracedoffload.tracing.fanout import ExportFanout, ExportSettings
from tracedoffload.tracing.generations import GenerationLedger, new_span_context
from tracedoffload.tracing.pipeline import GenerationListener, StepListener, StepPipeline
from tracedoffload.tracing.recorder import GenerationEnd, GenerationInfo, PlannedSequence, TracingTimeline
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.stats import OffloadStats
from tracedoffload.tracing.step_spans import SpanFactory, StepTimer
from tracedoffload.tracing.worker import TelemetryWorker

log = get_logger("tracedoffload.tracing")

SCOPE_NAME = "tracedoffload"


@dataclasses.dataclass
class GenerationHandle:
    """A running generation; set `output_tokens` (and `finish_reason`) before it ends."""

    generation_id: str
    span_context: SpanContext | None  # its span's (None when tracing is off)
    output_tokens: int = 0
    finish_reason: str = "length"
    _info: GenerationInfo | None = None
    _opened: Any = None
    _attributes: dict[str, Any] = dataclasses.field(default_factory=dict)
    _parent: SpanContext | None = None
    _kind: SpanKind = SpanKind.INTERNAL
    _end_ns: int | None = None  # when it finished, if that was said before it ended (`finish_generation`)
    _ended: bool = False


class TracingSession:
    """Traces an offloaded model: one trace per step (forward pass), linked to its generations.

    Args:
        exporters: where sampled spans go (OTLP, a JSON-lines file, Perfetto, ...); may be empty,
            statistics are kept regardless.
        policy: level of detail and the tail rule for layer spans.
        per_step_traces: True (default): each step is its own trace, linked to the generations
            it served; False: one trace per generation, a step that serves only that generation
            being a child of its span (a step of several generations stays a root, linked).
        resource: the OpenTelemetry resource; by default `default_resource()`: OTEL_SERVICE_NAME
            and OTEL_RESOURCE_ATTRIBUTES, with service.name `tracedoffload` when neither names one.
        max_queued_steps: steps waiting for the telemetry thread before new ones are dropped.
        batch_interval_s: how long the telemetry thread rests between batches of steps (0: wake
            for every step). Listeners, hence live metrics, lag by up to this much.
        export: bounds of the export path.

    Generations: `generation()` (one) or `generations()` (a batch) trace the forwards run in their
    context; `open_generation()` / `end_generation()` with `plan_step()` are for a scheduler
    that runs many generations' sequences in one forward (continuous batching). Any number may be
    open at once, from any thread; each step is attributed to the generations it served.

    Threading: `attach`, `plan_step` and the steps from the model's thread; generations from any
    thread; `snapshot` from any. Never raises into the model: telemetry failures are logged and
    counted.

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
        per_step_traces: bool = True,
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
        self.per_step_traces = per_step_traces
        self.stats = OffloadStats()
        self._fanout = ExportFanout(list(exporters), export or ExportSettings())
        self.resource = resource or default_resource()
        self._scope = InstrumentationScope(SCOPE_NAME, __version__)
        ledger = GenerationLedger(self.resource, self._scope, step_events=self.policy.level in ("token", "layer"))
        self._pipeline = StepPipeline(self.policy, self.stats, self._fanout, ledger)
        self._offloader: Offloader | None = None
        self._recorder: TracingTimeline | None = None
        self._model_attributes: dict[str, Any] = {}
        self._clock: Any = None
        self._worker = TelemetryWorker(self._pipeline.handle, max_queued_steps, float(batch_interval_s))
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
        self._clock = streams.clock
        offload_attributes = offload_span_attributes(offloader)
        self._model_attributes = model_size_attributes(offloader)
        timer = StepTimer(self._clock.resolve, len(offloader.layers), host_clock=self._clock.host)
        factory = SpanFactory(self.resource, self._scope, streams.copy_stream_name, offload_attributes)
        self._pipeline.bind(timer, factory, None if self._clock.host else self._clock.recycle)
        quiet_point = self.monitor.quiet_point if self.monitor is not None else None
        self._recorder = TracingTimeline(self._submit, self._clock.anchor(), offload_attributes, quiet_point, reanchor=self._clock.anchor)
        self._offloader = offloader
        offloader.timeline = self._recorder

    def trace_draft(self, draft_model: Any) -> Callable[[], None]:
        """Time every forward of a speculative decoding's draft model (kept resident, not
        offloaded): each is a `draft.forward` span under the step that verifies what it drafted,
        and that step starts at its first draft forward (drafting is part of making its tokens).
        Returns what removes the hooks. Attach the offloader first."""
        recorder, clock = self._recorder, self._clock
        if recorder is None or clock is None:
            return lambda: None
        started: list[Any] = []

        def before(module: Any, args: Any) -> None:
            started.append(clock.mark())

        def after(module: Any, args: Any, output: Any) -> None:
            if started:
                recorder.draft(LayerRecord(DRAFT, -1, started.pop(), clock.mark(), 0, -1, False))

        handles = [draft_model.register_forward_pre_hook(before), draft_model.register_forward_hook(after)]
        def remove() -> None:
            for handle in handles:
                handle.remove()

        return remove

    def trace_early_exit(self, model: Any) -> Callable[[], None]:
        """Trace early-exit self-speculation: while transformers drafts with the model's first
        layers (it lowers the decoder's `config.num_hidden_layers` for those forwards), each
        forward is a `draft.forward` span under the step verifying it, not a step of its own.
        Returns what stops it. Attach the offloader first."""
        recorder = self._recorder
        if recorder is None:
            return lambda: None
        config = getattr(model, model.base_model_prefix).config
        full = config.num_hidden_layers
        recorder.draft_forwards_when(lambda: config.num_hidden_layers < full)
        return lambda: recorder.draft_forwards_when(None)

    def detach(self) -> None:
        """Stop tracing the attached offloader (its timeline goes back to the no-op one)."""
        if self._offloader is not None:
            self._offloader.timeline = NullTimeline()
            self._offloader = None
        if self._recorder is not None:
            self._recorder.clear_current()

    def monitor_memory(self, monitor: Any) -> None:
        """Add a `tracedoffload.memory.monitor.MemoryMonitor` (before `attach`): memory on every step span,
        leak detection and alerts."""
        if self._recorder is not None:
            raise TracingStateError("monitor_memory() must be called before attach()")
        self.monitor = monitor
        self._pipeline.monitor = monitor

    def add_step_listener(self, listener: StepListener) -> None:
        """Call `listener(timing, stats)` on the telemetry thread after each step is aggregated."""
        self._pipeline.step_listeners.append(listener)

    def add_generation_listener(self, listener: GenerationListener) -> None:
        """Call `listener(result)` on the telemetry thread when a generation has ended (after its steps)."""
        self._pipeline.generation_listeners.append(listener)

    # -- generations ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def generation(
        self, model_name: str, input_tokens: int, max_new_tokens: int | None = None, *, parent: SpanContext | None = None
    ) -> Iterator[GenerationHandle]:
        """Trace one generation: the forwards run in this context serve it."""
        with self.generations(model_name, [input_tokens], max_new_tokens, parent=parent) as handles:
            yield handles[0]

    @contextlib.contextmanager
    def generations(
        self, model_name: str, input_tokens: Sequence[int], max_new_tokens: int | None = None, *, parent: SpanContext | None = None
    ) -> Iterator[list[GenerationHandle]]:
        """Trace a batch: one generation per sequence (per row of the forwards run in this
        context), each with its own span, output length and finish reason.

        Args:
            input_tokens: each sequence's prompt length, without padding.
            parent: the span the generations' spans are children of (a request's), if any.
        """
        handles = [self._new_handle(model_name, count, max_new_tokens, parent) for count in input_tokens]
        recorder = self._recorder
        opened = context_token = None
        if recorder is not None and handles[0]._info is not None:
            self._before_opening(recorder)
            opened, context_token = recorder.open_in_context([h._info for h in handles])
        try:
            yield handles
        finally:
            if recorder is not None and opened is not None:
                recorder.close(opened, context_token, [h.output_tokens for h in handles])
            for handle in handles:
                self._submit_end(handle)

    def open_generation(
        self,
        model_name: str,
        input_tokens: int,
        max_new_tokens: int | None = None,
        *,
        parent: SpanContext | None = None,
        operation: str = names.GEN_AI_OPERATION,
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> GenerationHandle:
        """Start a generation that a scheduler serves through `plan_step` (no context needed);
        end it with `end_generation`. `operation`: the GenAI operation name, `text_completion`
        or `chat` (the span is named "{operation} {model}"); `kind`: the span's (a server's
        request: SERVER)."""
        handle = self._new_handle(model_name, input_tokens, max_new_tokens, parent, operation)
        handle._kind = kind
        recorder = self._recorder
        if recorder is not None and handle._info is not None:
            self._before_opening(recorder)
            handle._opened = recorder.open([handle._info])
        return handle

    def end_generation(
        self, handle: GenerationHandle, output_tokens: int | None = None, finish_reason: str | None = None, attributes: dict[str, Any] | None = None
    ) -> None:
        """End a generation from `open_generation` (idempotent); `attributes` are added to its span."""
        if attributes:
            handle._attributes.update(attributes)
        self._leave_batch(handle, output_tokens, finish_reason)
        self._submit_end(handle)

    def finish_generation(self, handle: GenerationHandle, output_tokens: int, finish_reason: str) -> None:
        """Say that a generation from `open_generation` finished, now, without ending it: its
        sequence leaves the batch (its KV is no longer counted) and its end time is kept, and its
        owner ends it with `end_generation` (adding what it knows, say a request's id) when it
        can. A scheduler's thread calls this at the step a request finishes; the request's own
        code may only learn of it later."""
        if handle._end_ns is not None or handle._ended:
            return
        handle._end_ns = time.time_ns()
        self._leave_batch(handle, output_tokens, finish_reason)

    def _leave_batch(self, handle: GenerationHandle, output_tokens: int | None, finish_reason: str | None) -> None:
        """Its counts set (None: kept as they are), its sequence out of the batch (once)."""
        if output_tokens is not None:
            handle.output_tokens = output_tokens
        if finish_reason is not None:
            handle.finish_reason = finish_reason
        if self._recorder is not None and handle._opened is not None:
            self._recorder.close(handle._opened, output_tokens=[handle.output_tokens])
            handle._opened = None

    def plan_step(self, sequences: Sequence[PlannedSequence], kv_tokens: int | None = None) -> None:
        """Say which generations the next forward serves and how (model's thread, just before the
        forward; see `recorder.PlannedSequence`). Without a plan, a forward serves the
        generations opened in its context."""
        if self._recorder is not None:
            self._recorder.plan_step(sequences, kv_tokens)

    def _new_handle(
        self, model_name: str, input_tokens: int, max_new_tokens: int | None, parent: SpanContext | None, operation: str = names.GEN_AI_OPERATION
    ) -> GenerationHandle:
        if self._closed:
            raise TracingStateError("this TracingSession is shut down: a generation opened now would record nothing")
        check_int("input_tokens", input_tokens, 0)
        generation_id = secrets.token_hex(8)
        if self._orphaned and not self._fork_warned:
            self._fork_warned = True
            log.warning("tracing.forked_session", created_in=self._pid, pid=os.getpid(), hint="create a TracingSession after the fork; steps are dropped")
        if self.policy.level == "off" or self._orphaned:
            return GenerationHandle(generation_id, None)
        attributes: dict[str, Any] = {
            names.GEN_AI_OPERATION_NAME: operation,
            names.GEN_AI_PROVIDER_NAME: names.PROVIDER,
            names.GEN_AI_REQUEST_MODEL: model_name,
            names.GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
        }
        if max_new_tokens is not None:
            attributes[names.GEN_AI_REQUEST_MAX_TOKENS] = max_new_tokens
        if self._recorder is not None:
            attributes.update(self._recorder.offload_attributes)
            attributes.update(self._model_attributes)
        context = new_span_context(parent)
        info = GenerationInfo(generation_id, context, self.per_step_traces, input_tokens, time.time_ns())
        return GenerationHandle(generation_id, context, _info=info, _attributes=attributes, _parent=parent)

    def _before_opening(self, recorder: TracingTimeline) -> None:
        if self.monitor is not None and recorder.live_generations == 0:
            self.monitor.idle_point()  # nothing holds a KV cache now: leaks across generations show
        if recorder.live_generations == 0 and self._clock is not None:
            recorder.reanchor_now(self._clock.anchor())

    def _submit_end(self, handle: GenerationHandle) -> None:
        if handle._ended or handle._info is None:
            return
        handle._ended = True
        end_ns = handle._end_ns if handle._end_ns is not None else time.time_ns()
        end = GenerationEnd(handle._info, end_ns, handle.output_tokens, handle.finish_reason, handle._attributes, handle._parent, handle._kind)
        if self._orphaned:
            self._worker.refuse(spans=1)
        else:
            self._worker.submit_last(end)

    # -- results --------------------------------------------------------------------------------

    @property
    def dropped_spans(self) -> int:
        """Spans lost so far: dropped before they were made, or handed to an exporter and not sent."""
        if self._orphaned:  # the exporters' counters live on in the parent
            return self._worker.dropped_spans
        return self._worker.dropped_spans + (self._fanout.lost() if self._closed else self._fanout.failed())

    @property
    def telemetry_cpu_s(self) -> dict[str, float]:
        """CPU seconds spent so far by the telemetry thread and by the export threads."""
        return {"telemetry": self._worker.cpu_s, "export": self._fanout.cpu_s}

    def snapshot(self) -> dict[str, Any]:
        """The statistics of everything traced so far (see `tracedoffload.tracing.stats`)."""
        snapshot = self.stats.snapshot(dropped_spans=self.dropped_spans)
        snapshot["dropped_steps"] = self._worker.dropped_items
        snapshot["telemetry_errors"] = self._worker.errors
        return snapshot

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait (bounded) until every finished step is aggregated: the statistics are complete.
        Exports may still be in flight (`flush` waits for those too); no network is waited on."""
        if self._orphaned:
            return False
        return self._worker.drain(timeout_s)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait (bounded) until every finished step is aggregated and handed to the exporters."""
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

    # -- the hand-over to the telemetry thread ---------------------------------------------------

    def _submit(self, payload: Any) -> bool:
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


def default_resource() -> Resource:
    """The SDK's resource from the environment, named `tracedoffload` unless the environment names
    the service (the SDK's own fallback, `unknown_service:python3`, is not searchable)."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: names.SERVICE_NAME_DEFAULT}))
    return resource


def offload_span_attributes(offloader: Offloader) -> dict[str, Any]:
    """The offload configuration as span attributes (on the generation and on every step)."""
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


def model_size_attributes(offloader: Offloader) -> dict[str, Any]:
    """The model's sizes as the planner computes them (generation spans only: they never change
    within a run, and a step span is the hot path's), so a trace alone can be re-planned."""
    from tracedoffload.planner import ModelPlan

    plan = ModelPlan.from_layers(offloader.model, offloader.layers)
    return {
        names.MODEL_LAYER_BYTES: list(plan.layer_bytes),
        names.MODEL_BASE_BYTES: plan.base_bytes,
        names.MODEL_KV_BYTES_PER_TOKEN: plan.kv_bytes_per_token,
        names.MODEL_ACTIVATION_BYTES_PER_TOKEN: plan.activation_bytes_per_token,
        names.MODEL_LOGITS_BYTES: plan.logits_bytes,
    }
