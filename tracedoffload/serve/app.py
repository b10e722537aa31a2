"""The HTTP side of `serve`: OpenAI's routes over the engine, FastAPI on uvicorn.

    POST /v1/chat/completions   messages -> the chat template -> the engine (stream or not)
    POST /v1/completions        prompt -> the engine
    GET  /v1/models             the one model served
    GET  /health                the process answers (200)
    GET  /ready                 the engine can take requests (200), or not (503)
    GET  /metrics               Prometheus exposition of the telemetry's metrics

Every error is OpenAI's error shape (`protocol.ApiError`): 400 naming the field, 401 without the
API key, 404 for an unknown model, 413 for a body over the limit, 429 with Retry-After when the
engine (or this client's share of it) is full, 503 while draining or with the engine down, 500
when the engine failed; never a traceback. Bodies are read and checked here, not by FastAPI's
validation (whose 422 and error shape are not OpenAI's). Every answer carries an x-request-id,
and every completion request ends in one outcome of the server's request counter.

Prompts and answers reach the request's span only with `record_content` (`--record-content`),
and never the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tracedoffload import names
from tracedoffload.generation import uses_chat_template
from tracedoffload.logs import get_logger
from tracedoffload.serve.admission import QueueFull
from tracedoffload.serve.choices import Choice, close_all, collect, events
from tracedoffload.serve.engine import Draining, Engine, EngineFailed, RequestNotes
from tracedoffload.serve.protocol import ApiError, chunk, completion, logprobs_of, new_id, parse_request, usage_chunk
from tracedoffload.serve.request_context import RequestIdMiddleware, authorized, caller_context
from tracedoffload.serve.text import TextStream

log = get_logger("tracedoffload.serve")

DEFAULT_MAX_BODY_BYTES = 1 << 20
DISCONNECT_CHECK_S = 0.5  # how often a request being answered looks whether its client is still there


def create_app(
    engine: Engine,
    *,
    registry: Any = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: Any = None,
    api_key: str | None = None,
    record_content: bool = False,
) -> RequestIdMiddleware:
    """The app over a started `engine`. `registry`: the Prometheus registry /metrics serves;
    `metrics`: the server's metrics (`serve/metrics.py`); `api_key`: the bearer token /v1/*
    asks for (None: none)."""
    app = FastAPI(title="tracedoffload", docs_url=None, redoc_url=None, openapi_url=None)

    def count(request: Request, outcome: str) -> None:
        if metrics is not None and request.url.path.startswith("/v1/") and request.method == "POST":
            metrics.request_ended(outcome)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        count(request, _outcome(error.status))
        headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else {}
        if error.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(error.body(), status_code=error.status, headers=headers or None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        count(request, names.OUTCOME_FAILED)
        log.error("serve.unexpected_error", path=request.url.path, request_id=request.state.request_id, error=repr(error), exc_info=error)
        return JSONResponse(ApiError(500, "internal error (logged on the server)", kind="server_error").body(), status_code=500)

    def check_key(request: Request) -> None:
        if not authorized(request.headers, api_key):
            raise ApiError(401, "a valid API key is needed: send the header Authorization: Bearer <key>", kind="invalid_request_error", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if engine.accepting:
            return JSONResponse({"status": "ready"})
        reason = "draining: the server is shutting down" if engine.draining else engine.failure or "the engine is not running"
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        if registry is None:
            raise ApiError(404, "no metrics: they come from the offloaded model's telemetry (not with --trace-level off or --no-offload)", kind="not_found_error")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS, generate_latest as openmetrics

        if "application/openmetrics-text" in request.headers.get("accept", ""):  # exemplars need OpenMetrics
            return Response(openmetrics(registry), media_type=OPENMETRICS)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0, "owned_by": "tracedoffload"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _complete(request, "chat")

    @app.post("/v1/completions")
    async def text(request: Request) -> Response:
        return await _complete(request, "text")

    async def _complete(http: Request, kind: str) -> Response:
        check_key(http)
        body = await _read_body(http, max_body_bytes)
        request = parse_request(body, kind)
        if request.model != engine.model_name:
            raise ApiError(404, f"model {request.model!r} does not exist; this server serves {engine.model_name!r} (GET /v1/models)", "model", "not_found_error", "model_not_found")
        if request.sampling is not None and not engine.settings.sampling:
            if request.sampling.sampled:
                raise ApiError(400, f"temperature: {request.sampling.temperature!r}: 0 or absent; this server decodes greedily only (started with --greedy-only)", "temperature")
            field = "logprobs" if request.sampling.logprobs is not None else request.sampling.penalties[0][0]
            raise ApiError(400, f"{field}: not with this server, started with --greedy-only (no per-request processors); leave it out", field)
        prompt_ids = _prompt_ids(engine, request)
        limit = engine.settings.max_context_tokens
        max_tokens = request.max_tokens or min(engine.settings.default_max_tokens, max(1, limit - len(prompt_ids)))
        prompt_field = "messages" if kind == "chat" else "prompt"
        if len(prompt_ids) >= limit:
            raise ApiError(400, f"{prompt_field}: {len(prompt_ids)} prompt tokens; the context is {limit} tokens (--max-context-tokens), the answer's included", prompt_field)
        if len(prompt_ids) + max_tokens > limit:
            raise ApiError(400, f"max_tokens: {max_tokens}; at most {limit - len(prompt_ids)} after this prompt's {len(prompt_ids)} tokens (a context of {limit}, --max-context-tokens)", "max_tokens")
        client = http.client.host if http.client else None
        tickets = []
        try:
            for _ in range(request.n):  # a place per choice: n samples are n sequences in the batch
                tickets.append(engine.admit(request.priority, client))
        except (QueueFull, EngineFailed) as error:
            for ticket in tickets:
                engine.admission.release(ticket)
            if isinstance(error, QueueFull):
                raise ApiError(429, str(error), kind="rate_limit_error", code="rate_limit_exceeded", retry_after_s=error.retry_after_s) from None
            if isinstance(error, Draining):
                raise ApiError(503, str(error), kind="server_error") from None
            raise ApiError(503, f"the engine cannot take requests: {error}", kind="server_error") from None
        response_id = new_id(kind)
        parent, baggage_attributes = caller_context(http.headers)
        choices = [_choice(index, ticket, request, http, response_id, parent, baggage_attributes, prompt_ids, max_tokens, kind) for index, ticket in enumerate(tickets)]
        if request.stream:
            return StreamingResponse(_events(http, request, response_id, choices, len(prompt_ids)), media_type="text/event-stream")
        collecting = asyncio.ensure_future(asyncio.gather(*(collect(choice) for choice in choices)))
        try:
            # The client may leave while its answer is made (a timeout, a retry): look every
            # half second, and cancel it in the engine then rather than finish it for nobody.
            while not (await asyncio.wait({collecting}, timeout=DISCONNECT_CHECK_S))[0]:
                if await http.is_disconnected():
                    count(http, names.OUTCOME_CANCELLED)
                    return Response(status_code=499)  # nginx's "client closed request": nobody reads it
            collecting.result()
        except EngineFailed as error:
            raise ApiError(500, str(error), kind="server_error") from None
        finally:
            collecting.cancel()
            # Let the cancelled tasks leave the generators first: closing a generator another
            # task is still inside raises.
            await asyncio.gather(collecting, return_exceptions=True)
            await close_all(choices, engine.admission)  # also when a generator never started
        failed = any(choice.finish_reason == "error" for choice in choices)
        count(http, names.OUTCOME_FAILED if failed else names.OUTCOME_COMPLETED)
        answers = [(choice.text.sent, choice.finish_reason or "length", logprobs_of(request, choice.logprobs, _token_text)) for choice in choices]
        return JSONResponse(completion(request, response_id, answers, len(prompt_ids), sum(len(choice.tokens) for choice in choices)))

    def _token_text(token: int) -> str:
        return engine.tokenizer.decode([token], skip_special_tokens=False)

    def _choice(
        index: int, ticket: Any, request: Any, http: Request, response_id: str, parent: Any, baggage_attributes: dict[str, str], prompt_ids: list[int], max_tokens: int, kind: str
    ) -> Choice:
        """Choice `index` of the request, in the engine (or in line) from now on: its own span,
        and its own seed (the request's plus its index) when the request gave one."""
        notes = RequestNotes({
            **baggage_attributes,
            names.REQUEST_ID: http.state.request_id,
            names.GEN_AI_RESPONSE_ID: response_id,
            names.REQUEST_PRIORITY: request.priority,
            names.REQUEST_CHOICE: index,
        })
        text_stream = TextStream(engine.tokenizer, request.stop)
        if record_content:
            notes.attributes[names.GEN_AI_INPUT_MESSAGES] = json.dumps(request.messages if request.messages is not None else [{"role": "user", "content": request.prompt}])
            notes.on_end = lambda attributes: attributes.update({names.GEN_AI_OUTPUT_MESSAGES: json.dumps([{"role": "assistant", "content": text_stream.sent}])})
        sampling = request.sampling
        if sampling is not None and sampling.seed is not None and index:
            sampling = dataclasses.replace(sampling, seed=sampling.seed + index)
        outputs = engine.generate(ticket, prompt_ids, max_tokens, sampling=sampling, chat=kind == "chat", parent=parent, notes=notes)
        return Choice(index, ticket, outputs, text_stream, notes)

    async def _events(http: Request, request: Any, response_id: str, choices: list[Choice], prompt_tokens: int) -> AsyncIterator[str]:
        outcome = names.OUTCOME_CANCELLED  # unless it ends below: the client left mid-stream
        merged = events(choices)
        try:
            async for choice, new, first in merged:
                fresh = choice.logprobs[choice.reported :]
                logprobs = logprobs_of(request, fresh, _token_text, choice.reported_chars)
                choice.reported = len(choice.logprobs)
                if logprobs is not None and "tokens" in logprobs:  # completions: their text, decoded once above
                    choice.reported_chars += sum(map(len, logprobs["tokens"]))
                yield _sse(chunk(request, response_id, new, None, first=first, index=choice.index, logprobs=logprobs))
                if choice.finish_reason is not None:
                    yield _sse(chunk(request, response_id, None, choice.finish_reason, index=choice.index))
            failed = any(choice.finish_reason == "error" for choice in choices)
            outcome = names.OUTCOME_FAILED if failed else names.OUTCOME_COMPLETED
        except EngineFailed as error:
            outcome = names.OUTCOME_FAILED
            yield _sse(ApiError(500, str(error), kind="server_error").body())
        finally:
            # Closed here, not left to the garbage collector: its followers stop, and each
            # choice's generation ends now (cancelled, if the client left).
            await merged.aclose()
            await close_all(choices, engine.admission)  # also when the client left before the first token
            count(http, outcome)
        if request.include_usage:
            yield _sse(usage_chunk(request, response_id, prompt_tokens, sum(len(choice.tokens) for choice in choices)))
        yield "data: [DONE]\n\n"

    # Outermost, so that every answer carries the id, a 500 from the last-resort handler included.
    return RequestIdMiddleware(app)


def _prompt_ids(engine: Engine, request: Any) -> list[int]:
    """Token ids of a chat (through the tokenizer's chat template) or of a plain prompt."""
    if request.messages is None:
        return list(engine.tokenizer(request.prompt)["input_ids"])
    if not uses_chat_template(engine.tokenizer):
        raise ApiError(400, f"messages: {engine.model_name} has no chat template: send a plain prompt to /v1/completions", "messages")
    encoded = engine.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, return_dict=True)
    return list(encoded["input_ids"])


def _outcome(status: int) -> str:
    """A refused or failed request's outcome, from its status."""
    if status == 401:
        return names.OUTCOME_UNAUTHORIZED
    if status == 429:
        return names.OUTCOME_REJECTED
    if status == 503:
        return names.OUTCOME_UNAVAILABLE
    return names.OUTCOME_FAILED if status >= 500 else names.OUTCOME_INVALID


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (by its declared length, or as it streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is {declared} bytes; the limit is {limit} (--max-body-bytes)", kind="invalid_request_error")
    received = bytearray()
    async for piece in request.stream():
        received += piece
        if len(received) > limit:
            raise ApiError(413, f"the body is over the limit of {limit} bytes (--max-body-bytes)", kind="invalid_request_error")
    return bytes(received)
