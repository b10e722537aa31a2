"""Tracing transformers' continuous batching: each forward of its manager becomes a step of the
requests it served, each request a generation.

transformers (5.x) runs continuous batching on a thread of its own: at each step its scheduler
packs prefill chunks and decode tokens of many requests into one `[1, total_tokens]` forward.
`trace_continuous_batching(model, session)` tells the tracing session, just before each of those
forwards, which requests it serves and how (`TracingSession.plan_step`), opens a generation per
request the first time one is scheduled (or uses the one given to `track`), and ends it when the
manager marks the request finished. A generation given to `track` belongs to its caller: it is
only marked finished then (`finish_generation`: out of the batch, its end time kept), and its
caller ends it, with what only the caller knows (a request's id, its queue time).

What this reads of transformers is not public API (the batch processor's `requests_in_batch`
and each request state's counters, as of transformers 5.24): it is read in one place, here. Should
a later version move it, one error is logged naming what failed, and the forwards are still traced
as steps, without their requests.

Threading: the hooks run on the manager's generation thread. Never raises into it (a raising
hook would stop the manager and fail every request): a failure is logged once and tracing of
that forward is skipped.
"""

from __future__ import annotations

import threading
from typing import Any

from torch import nn

from tracedoffload import names
from tracedoffload.generation import FINISH_LENGTH, FINISH_STOP, eos_ids
from tracedoffload.logs import get_logger
from tracedoffload.tracing.recorder import PlannedSequence
from tracedoffload.tracing.session import GenerationHandle, TracingSession

log = get_logger("tracedoffload.continuous_batching")


class ContinuousBatchingTracer:
    """Feeds a tracing session the steps of a transformers continuous-batching manager.

    Made by `trace_continuous_batching`; `close()` removes its hooks (ending any generation still
    open as interrupted).
    """

    def __init__(self, model: nn.Module, session: TracingSession, model_name: str, open_untracked: bool = True) -> None:
        self.model = model
        self.open_untracked = open_untracked
        self.session = session
        self.model_name = model_name
        self.manager: Any = None
        self._handles: dict[str, GenerationHandle] = {}
        self._tracked: set[str] = set()  # request ids whose generation its caller ends
        self._lock = threading.Lock()  # `track` may come from a request thread
        self._wrapped: set[int] = set()
        self._failures = 0
        self._original_init = model.init_continuous_batching
        # The instance attribute shadows the public method: every manager made for this model
        # (generate_batch makes its own) is seen.
        model.init_continuous_batching = self._capture_manager
        # Before the offloader's step hook (registered first): the plan must be set when the step begins.
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True, prepend=True)

    def track(self, request_id: str, handle: GenerationHandle) -> None:
        """Serve request `request_id` as the generation `handle` (opened by the caller with
        `session.open_generation`, so that its span starts when the request arrived)."""
        with self._lock:
            self._handles[request_id] = handle
            self._tracked.add(request_id)

    def untrack(self, request_id: str) -> None:
        """Forget request `request_id` (its caller ended its generation: finished, cancelled or
        failed), so that a long-running server keeps nothing per request it served."""
        with self._lock:
            self._handles.pop(request_id, None)
            self._tracked.discard(request_id)

    def close(self) -> None:
        self._hook.remove()
        if self.model.__dict__.get("init_continuous_batching") is self._capture_manager:
            del self.model.init_continuous_batching
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            self.session.end_generation(handle, finish_reason="interrupted")

    def __enter__(self) -> ContinuousBatchingTracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the manager's thread -------------------------------------------------------------------

    def _capture_manager(self, *args: Any, **kwargs: Any) -> Any:
        self.manager = self._original_init(*args, **kwargs)
        return self.manager

    def _before_forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        processor = getattr(self.manager, "batch_processor", None)
        if processor is None or "cu_seq_lens_q" not in kwargs:  # not a continuous-batching forward
            return None
        try:
            self._plan(processor)
        except Exception as error:  # noqa: BLE001 - a raising hook would fail every request
            self._failures += 1
            if self._failures == 1:
                log.error("continuous_batching.trace_failed", error=repr(error), hint="this forward is traced without its requests")
        return None  # anything else would replace the forward's inputs

    def _plan(self, processor: Any) -> None:
        if id(processor) not in self._wrapped:
            self._wrap_update(processor)
        planned = []
        for future in processor.inputs_and_outputs.requests_in_batch:
            state = future.state
            handle = self._handle_for(state)
            if handle is None:  # a request its caller ended already (cancelled, not yet out of the batch)
                continue
            tokens = int(future.query_length)
            position = int(state.position_offset) - tokens  # already advanced past this step's tokens
            if not future.has_new_token:
                phase = names.PHASE_PREFILL_CHUNK
            elif state.generated_len() == 0:
                phase = names.PHASE_PREFILL
            else:
                phase = names.PHASE_DECODE
            planned.append(PlannedSequence(handle.generation_id, phase, tokens, 1 if future.has_new_token else 0, position))
        self.session.plan_step(planned)

    def _handle_for(self, state: Any) -> GenerationHandle | None:
        with self._lock:
            handle = self._handles.get(state.request_id)
            if handle is None and self.open_untracked:
                handle = self.session.open_generation(self.model_name, len(state.initial_tokens), getattr(state, "max_new_tokens", None))
                self._handles[state.request_id] = handle
        return handle

    def _wrap_update(self, processor: Any) -> None:
        """End each request's generation when the manager marks it finished (after the step's
        outputs are applied, on the same thread)."""
        original = processor.update_batch
        tracer = self

        def update_batch() -> None:
            original()
            try:
                tracer._end_finished(processor)
            except Exception as error:  # noqa: BLE001 - see _before_forward
                tracer._failures += 1
                if tracer._failures == 1:
                    log.error("continuous_batching.trace_failed", error=repr(error))

        processor.update_batch = update_batch
        self._wrapped.add(id(processor))

    def _end_finished(self, processor: Any) -> None:
        for future in processor.inputs_and_outputs.requests_in_batch:
            state = future.state
            if not state.status.name.startswith("FINISHED") and state.status.name != "FAILED":
                continue
            with self._lock:
                handle = self._handles.pop(state.request_id, None)
                tracked = state.request_id in self._tracked
                self._tracked.discard(state.request_id)
            if handle is None:
                continue
            generated = list(state.generated_tokens)
            eos = eos_ids(self.model)
            if state.status.name == "FAILED":
                reason = "error"
            else:
                reason = FINISH_STOP if generated and generated[-1] in eos else FINISH_LENGTH
            if tracked:
                self.session.finish_generation(handle, len(generated), reason)
            else:
                self.session.end_generation(handle, len(generated), reason)


def trace_continuous_batching(model: nn.Module, session: TracingSession, model_name: str = "", *, open_untracked: bool = True) -> ContinuousBatchingTracer:
    """Trace every continuous-batching manager of `model` (attach the offloader and the session
    first). Use it as a context manager, or `close()` it. `open_untracked`: open a generation for
    a request nobody gave to `track` (False for a caller that tracks every request it adds: a
    request it cancelled may still be in the batch for a step, and must not come back as a new
    generation).

    Example:
        >>> with trace_continuous_batching(model, session, "smollm2"):
        ...     outputs = model.generate_batch(inputs=prompts, generation_config=config,
        ...                                    continuous_batching_config=sizing)
    """
    if not hasattr(model, "init_continuous_batching"):
        from tracedoffload._exceptions import ConfigError

        raise ConfigError("model", type(model).__name__, "a transformers model with continuous batching (init_continuous_batching)")
    return ContinuousBatchingTracer(model, session, model_name, open_untracked)
