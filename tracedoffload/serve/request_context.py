"""Who asks and from which trace: a request's id, its caller's trace context, its API key.

- **x-request-id.** Every answer carries one: the caller's when it sent a sane one (up to 128 of
  `A-Z a-z 0-9 . _ : -`), else a new one. It is on the request's span (`request.id`) and in the
  server's log lines, so a support ticket quoting it finds the trace.
- **Trace context.** `traceparent` / `tracestate` / `baggage` are read with the propagators that
  `OTEL_PROPAGATORS` configures (the OpenTelemetry API's global propagator; default W3C trace
  context and baggage): the request's span is a child of the caller's. Baggage entries go on the
  span as attributes, as OpenTelemetry's baggage span processor does, a bounded few.
- **API key.** With a key set, `/v1/*` asks for `Authorization: Bearer <key>`, compared in
  constant time (`hmac.compare_digest`): a wrong key takes as long to refuse as a nearly right one.
"""

from __future__ import annotations

import hmac
import re
import uuid
from typing import Any

from opentelemetry import baggage, propagate, trace
from opentelemetry.trace import SpanContext

REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_BAGGAGE_ATTRIBUTES = 16
MAX_BAGGAGE_VALUE = 256


def request_id(headers: Any) -> str:
    """The caller's x-request-id when sane, else a new one."""
    given = headers.get(REQUEST_ID_HEADER)
    if given and _SANE_REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def caller_context(headers: Any) -> tuple[SpanContext | None, dict[str, str]]:
    """The caller's span context (None when it sent none, or a malformed one) and its baggage,
    as span attributes (`baggage.<key>`)."""
    context = propagate.extract(headers)
    parent = trace.get_current_span(context).get_span_context()
    entries = {}
    for key, value in list(baggage.get_all(context).items())[:MAX_BAGGAGE_ATTRIBUTES]:
        entries[f"baggage.{key}"] = str(value)[:MAX_BAGGAGE_VALUE]
    return (parent if parent.is_valid else None), entries


def authorized(headers: Any, api_key: str | None) -> bool:
    """True without a key; with one, when the bearer token equals it (constant time)."""
    if api_key is None:
        return True
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    return hmac.compare_digest(token.strip().encode(), api_key.encode()) and scheme.lower() == "bearer"


class RequestIdMiddleware:
    """Pure ASGI (no buffering, so streams and disconnect detection are untouched): gives every
    HTTP request an id in `scope["state"]["request_id"]` and puts it on the answer's headers."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}
        rid = request_id(headers)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
