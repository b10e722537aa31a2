"""The engine behind `serve`: transformers' continuous batching over the offloaded model.

One thread owns the model: the continuous-batching manager's. At every step boundary it lets
finished sequences leave and waiting ones join, within `max_batch_size` sequences and
`max_batch_tokens` tokens per forward, prefilling long prompts in chunks beside running decodes
(the manager's scheduler: a well-kept library's, not ours). Its paged KV cache is sized here,
explicitly (`num_blocks` pages of `page_size` tokens: room for `max_batch_size` sequences of
`max_context_tokens`), never from free memory; since that cache is allocated up front, the leak
detector expects no KV growth from it (`kv_bytes_per_token` 0).

Requests come from the event loop (`generate`, an async iterator of the request's outputs); the
manager delivers each output back on the loop (`register_result_handler`). Every request is a
generation of the tracing session, opened when it arrives (its span includes its time queued) and
served step by step through `continuous_batching.py`.

Admission (`admission.py`): at most `max_batch_size` requests are in the manager at once, up to
`max_queue` more wait by priority with aging, one more is refused (`QueueFull`, a 429 with
Retry-After). A request whose client goes away is cancelled, or leaves the line.
A dead manager thread fails every waiting request at once (`EngineFailed`, a 500) and turns
`ready` false.

Drain (`begin_drain`, then `cut_off` at the deadline): new requests are refused (`Draining`, a
503) while those in flight go on; at the cut-off each still running or waiting ends at once with
the finish reason `error`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import queue
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from opentelemetry.trace import SpanKind

from tracedoffload import names
from tracedoffload._checks import check_int, check_positive
from tracedoffload.generation import FINISH_LENGTH, FINISH_STOP, eos_ids
from tracedoffload.logs import get_logger
from tracedoffload.serve.admission import Admission, Ticket
from tracedoffload.serve.logprobs import LogprobLedger, TokenLogprob

log = get_logger("tracedoffload.serve")

FINISH_CANCELLED = "cancelled"  # the client went away
FINISH_ERROR = "error"
# How often a waiting request looks whether the manager's thread is still alive.
LIVENESS_CHECK_S = 0.5


class EngineFailed(Exception):
    """The engine's thread is gone: no request can be served."""


class Draining(EngineFailed):
    """The server is shutting down: it finishes the requests it has and takes no new one."""


_CUT = object()  # put in a request's output queue at the drain's cut-off


@dataclasses.dataclass
class RequestNotes:
    """What the HTTP side adds to a request's span; it may add until the request ends."""

    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)
    finish_reason: str | None = None  # set when the HTTP side ended the answer itself (a stop string)
    on_end: Callable[[dict[str, Any]], None] | None = None  # adds to the attributes as the request ends


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """The engine's bounds; each checked, with the field named."""

    max_batch_size: int = 8  # sequences per forward
    max_batch_tokens: int = 256  # tokens per forward (decodes plus prefill chunks)
    max_context_tokens: int = 2048  # prompt plus completion, per request
    max_queue: int = 64  # requests waiting beyond those in the batch
    max_per_client: int = 0  # places (in the batch and in line) one client may hold; 0: no limit
    default_max_tokens: int = 256  # completion tokens when a request does not say
    page_size: int = 16  # tokens per KV-cache page
    aging_s: float = 10.0  # a waiting request gains one priority class per this many seconds
    sampling: bool = True  # per-request sampling; False: greedy only, faster (no warpers on each step)

    def __post_init__(self) -> None:
        check_int("max_batch_size", self.max_batch_size, 1, 1024)
        check_int("max_batch_tokens", self.max_batch_tokens, self.max_batch_size, 1 << 20, meaning="at least max_batch_size: every running sequence decodes each step")
        check_int("max_context_tokens", self.max_context_tokens, 2, 1 << 20)
        check_int("max_queue", self.max_queue, 0, 1 << 20)
        check_int("max_per_client", self.max_per_client, 0, 1 << 20)
        check_int("default_max_tokens", self.default_max_tokens, 1, self.max_context_tokens)
        check_int("page_size", self.page_size, 4, 4096)
        check_positive("aging_s", self.aging_s, "seconds > 0")

    @property
    def num_blocks(self) -> int:
        """KV pages for max_batch_size sequences of max_context_tokens each."""
        return self.max_batch_size * math.ceil(self.max_context_tokens / self.page_size)


class Output:
    """One request's progress: every token so far, whether (and why) it ended, and each token's
    log-probability when the request asked for them."""

    __slots__ = ("tokens", "finished", "finish_reason", "logprobs")

    def __init__(self, tokens: list[int], finished: bool, finish_reason: str | None, logprobs: list[TokenLogprob] | None = None) -> None:
        self.tokens = tokens
        self.finished = finished
        self.finish_reason = finish_reason
        self.logprobs = logprobs


class Engine:
    """Serves requests on `model` (offloaded or not) with continuous batching.

    Args:
        model, tokenizer: the loaded model.
        model_name: the id clients call it by.
        settings: the bounds.
        session: a `TracingSession` attached to the model's offloader, or None.
        metrics: the server's metrics (`serve/metrics.py`), or None.
    """

    def __init__(self, model: Any, tokenizer: Any, model_name: str, settings: EngineSettings, session: Any = None, metrics: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.settings = settings
        self.session = session
        self.stop_ids = eos_ids(model)
        self.admission = Admission(settings.max_batch_size, settings.max_queue, settings.aging_s, max_per_client=settings.max_per_client)
        self.metrics = metrics
        self.failure: str | None = None
        self.draining = False
        self._cut = False
        self._live: set[asyncio.Queue[Any]] = set()  # the output queues of requests being served
        self.logprobs = LogprobLedger()  # what requests asking for log-probabilities got, per token
        self._manager: Any = None
        self._tracer: Any = None

    # -- life ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Size the KV cache and start the manager's thread (attach the offloader first: the
        manager reads the model's placement when it starts)."""
        from transformers import ContinuousBatchingConfig, GenerationConfig

        from tracedoffload.serve.processors import install_request_processors

        settings = self.settings
        sizing = ContinuousBatchingConfig(
            page_size=settings.page_size,
            num_blocks=settings.num_blocks,
            max_batch_tokens=settings.max_batch_tokens,
            max_requests_per_batch=settings.max_batch_size,
            # Python hooks (the offloader's) do not run inside replayed CUDA graphs, and their
            # inputs are padded: off. Async batching would apply one batch's outputs a step late.
            use_cuda_graph=False,
            use_async_batching=False,
            auto_switch_to_flash=False,
            per_request_processors=settings.sampling,
        )
        if settings.sampling:
            # Sampling is decided per request (per-request temperature, top-k and top-p warpers);
            # the manager then samples every step, so a greedy request is a top-k of 1: its
            # argmax, exactly. The warpers exist only if the config names non-neutral values.
            decoding: dict[str, Any] = {"do_sample": True, "temperature": 0.5, "top_k": 1, "top_p": 0.5}
        else:
            decoding = {"do_sample": False}
        config = GenerationConfig(
            max_new_tokens=settings.default_max_tokens,
            eos_token_id=sorted(self.stop_ids) or None,
            pad_token_id=self.tokenizer.pad_token_id if getattr(self.tokenizer, "pad_token_id", None) is not None else 0,
            **decoding,
        )
        if self.session is not None:
            from tracedoffload.continuous_batching import trace_continuous_batching

            self._tracer = trace_continuous_batching(self.model, self.session, self.model_name, open_untracked=False)
        self._manager = self.model.init_continuous_batching(generation_config=config, continuous_batching_config=sizing)
        if settings.sampling:
            install_request_processors(self._manager.logit_processor, self.logprobs)
        self._manager.start()
        from tracedoffload.planner import kv_bytes_per_token

        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        kv_bytes = kv_bytes_per_token(self.model.config, dtype) * settings.num_blocks * settings.page_size if dtype is not None else None
        log.info(
            "engine.started",
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            kv_pages=settings.num_blocks,
            page_size=settings.page_size,
            kv_cache_bytes=kv_bytes,  # the planner's bytes per token times the pages' tokens
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._manager is not None:
            self._manager.stop(block=True, timeout=timeout_s)
            self._manager = None
        if self._tracer is not None:
            self._tracer.close()
            self._tracer = None

    @property
    def ready(self) -> bool:
        return self._manager is not None and self.failure is None and self._manager.is_running()

    @property
    def accepting(self) -> bool:
        """Takes new requests: ready and not draining."""
        return self.ready and not self.draining

    @property
    def in_flight(self) -> int:
        """Requests in the engine or in line."""
        return self.admission.inside + self.admission.waiting

    def kv_cache_bytes(self) -> tuple[int, int] | None:
        """(bytes held by live sequences, bytes allocated) of the paged KV cache, once it exists."""
        processor = getattr(self._manager, "batch_processor", None)
        cache = getattr(processor, "cache", None)
        if cache is None:
            return None
        limit = cache.num_sectors * cache.bytes_per_sector
        return limit - int(cache.compute_free_capacity(relative=False)), limit

    def begin_drain(self) -> None:
        """Refuse new requests from now on (`Draining`); those in flight go on."""
        self.draining = True

    def cut_off(self) -> None:
        """The drain's deadline: every request still served or waiting ends now, finish reason `error`."""
        self._cut = True
        for outputs in self._live:
            outputs.put_nowait(_CUT)

    # -- requests (the event loop) ----------------------------------------------------------------

    def admit(self, priority: int = 0, client: str | None = None) -> Ticket:
        """A place in line (raises QueueFull when the line is full, EngineFailed when the engine is
        down): synchronous, so a refusal comes before any work is done for the request."""
        if self.draining:
            raise Draining("the server is shutting down: it finishes the requests it has and takes no new one")
        if self.failure is not None or not self.ready:
            raise EngineFailed(self.failure or "the engine is not running")
        return self.admission.admit(priority, client)

    async def generate(
        self,
        ticket: Ticket,
        prompt_ids: list[int],
        max_tokens: int,
        *,
        sampling: Any = None,
        chat: bool = False,
        parent: Any = None,
        notes: RequestNotes | None = None,
    ) -> AsyncIterator[Output]:
        """Serve one request admitted with `ticket`: waits for its place, then yields its output
        after every step that gave it a token, the last one finished. Closing the iterator early
        (the client went away) cancels it, or takes it out of the line. `parent`: the caller's
        span context (the request's span is its child); `notes`: added to the request's span."""
        request_id = uuid.uuid4().hex
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        handle = None
        finished = False
        produced: list[int] = []
        reason = FINISH_CANCELLED
        queued_ns = None
        notes = notes if notes is not None else RequestNotes()
        wants_logprobs = sampling is not None and sampling.logprobs is not None
        self._live.add(outputs)
        try:
            if self.session is not None:
                # Opened now: the generation's span covers its time in line.
                operation = names.GEN_AI_OPERATION_CHAT if chat else names.GEN_AI_OPERATION
                handle = self.session.open_generation(self.model_name, len(prompt_ids), max_tokens, parent=parent, operation=operation, kind=SpanKind.SERVER)
                self._tracer.track(request_id, handle)
            arrived = time.monotonic_ns()
            while not await ticket.wait(LIVENESS_CHECK_S):
                if self._cut:
                    reason = FINISH_ERROR
                    yield Output([], True, FINISH_ERROR)
                    return
                self._check_alive()
            queued_ns = time.monotonic_ns() - arrived
            if self.metrics is not None:
                self.metrics.queued(queued_ns / 1e9, handle.span_context if handle is not None else None)
            self._manager.register_result_handler(request_id, outputs.put_nowait)
            self._manager.add_request(prompt_ids, request_id=request_id, max_new_tokens=max_tokens, streaming=True, **self._decoding(sampling))
            while True:
                try:
                    result = await asyncio.wait_for(outputs.get(), LIVENESS_CHECK_S)
                except TimeoutError:
                    self._check_alive()
                    continue
                if result is _CUT:
                    reason = FINISH_ERROR
                    yield Output(produced, True, FINISH_ERROR)
                    return
                produced = list(result.generated_tokens)
                logprobs = self.logprobs.take(request_id, len(produced)) if wants_logprobs else None
                if result.is_finished():
                    finished = True
                    if result.error:
                        reason = FINISH_ERROR
                        self._note_failure(result.error)
                        raise EngineFailed(f"the request failed in the engine: {result.error}")
                    reason = FINISH_STOP if produced and produced[-1] in self.stop_ids else FINISH_LENGTH
                    yield Output(produced, True, reason, logprobs)
                    return
                yield Output(produced, False, None, logprobs)
        finally:
            self._live.discard(outputs)
            self.admission.release(ticket)
            if not finished and ticket.admitted and self._manager is not None:
                self._manager.cancel_request(request_id)
            self._forget(request_id if not finished else None)
            self.logprobs.forget(request_id)
            if handle is not None:
                if queued_ns is not None:
                    notes.attributes[names.GENERATION_QUEUE_NS] = queued_ns
                if notes.on_end is not None:
                    notes.on_end(notes.attributes)
                # The manager's thread marked it finished when it was (its end time); it ends here,
                # with what only this side knows.
                self.session.end_generation(handle, len(produced), notes.finish_reason or reason, notes.attributes)
                self._tracer.untrack(request_id)

    def _forget(self, request_id: str | None) -> None:
        """The manager keeps a result handler per request until it finishes, and a cancelled
        request never does: drop its handler (`request_id`). The step in flight when it was
        cancelled may still give it an output, which then has nowhere to go but the manager's
        shared queue, which this engine never reads: empty that at every request's end. Without
        both, a server that runs for days grows with every client that left. Both are the
        manager's attributes, not public API (transformers 5.24)."""
        router = getattr(self._manager, "output_router", None)
        handlers, lock, stray = (getattr(router, name, None) for name in ("result_handlers", "_lock", "output_queue"))
        if request_id is not None and handlers is not None and lock is not None:
            with lock:
                handlers.pop(request_id, None)
        while stray is not None and not stray.empty():
            try:
                stray.get_nowait()
            except queue.Empty:
                break

    def _decoding(self, sampling: Any) -> dict[str, Any]:
        """The per-request warpers' settings: greedy is a top-k of 1; sampling, the request's."""
        if not self.settings.sampling:
            return {}
        if sampling is None or not sampling.sampled:
            warpers: dict[str, Any] = {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        else:
            vocabulary = int(getattr(self.model.config, "vocab_size", 0)) or 1 << 30
            warpers = {"temperature": sampling.temperature, "top_k": sampling.top_k or vocabulary, "top_p": sampling.top_p}
            if sampling.seed is not None:
                warpers["seed"] = sampling.seed
        if sampling is not None and sampling.logprobs is not None:
            warpers["logprobs"] = sampling.logprobs
        if sampling is not None:
            warpers.update(sampling.penalties)
        return warpers

    def _check_alive(self) -> None:
        manager = self._manager
        if manager is None or not manager.is_running():
            self._note_failure(None)
            raise EngineFailed(self.failure)

    def _note_failure(self, error: str | None) -> None:
        """Once the manager's thread is gone (a failed forward stops it and fails every request it
        held), the engine is down for good: `ready` turns false and new requests are refused."""
        manager = self._manager
        if manager is not None and manager.is_running():
            return  # one request failed, the engine lives on
        if self.failure is None:
            fatal = getattr(getattr(manager, "background_thread_status", None), "fatal_error", None)
            cause = fatal if fatal is not None else error
            self.failure = f"the engine thread stopped: {cause!r}" if cause is not None else "the engine thread stopped"
            log.error("engine.failed", reason=self.failure)

