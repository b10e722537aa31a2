"""OpenAI's request and response shapes, as `serve` takes and answers them.

Requests are checked here, field by field, before they reach the engine: a bad one is an
`ApiError` (400, or 404 for an unknown model) in OpenAI's error shape, naming the field and what
is valid. Parameters the engine cannot honour are refused by name, never silently ignored:
`UNSUPPORTED` (logit_bias, tools, best_of, ...) unless given their neutral value.

Decoding: greedy unless `temperature` is given above 0 (greedy is this server's default, where
OpenAI's is 1: an answer is reproducible unless sampling is asked for); then `top_p`, `top_k`
(as vLLM takes it, -1 or absent: off) and `min_p` apply, and `seed` makes the draw reproducible
whatever else shares the batch (serve/seeded_sampling.py). The penalties (`PENALTIES`) apply
greedy or not (serve/penalties.py); `logprobs` reports the model's own (serve/logprobs.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

MAX_STOP_STRINGS = 4
MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20  # `n`: samples of one request, each its own sequence in the batch
MAX_STOP_LENGTH = 128
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """An answer in OpenAI's error shape: status, message, type, and the field (`param`) at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # a Retry-After header (429)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param)


class Request:
    """A checked completion request (chat or plain)."""

    def __init__(
        self, kind: str, model: str, messages: list[dict[str, str]] | None, prompt: str | None, max_tokens: int | None, stop: list[str], stream: bool,
        include_usage: bool, priority: int = 0, sampling: Sampling | None = None, n: int = 1,
    ) -> None:
        self.n = n  # choices: samples of the prompt
        self.kind = kind  # "chat" or "text"
        self.priority = priority
        self.sampling = sampling  # None: greedy
        self.model = model
        self.messages = messages
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.stop = stop
        self.stream = stream
        self.include_usage = include_usage


def parse_request(body: bytes, kind: str) -> Request:
    """Check a `/v1/chat/completions` (kind "chat") or `/v1/completions` ("text") body.

    Raises:
        ApiError: 400 naming the field.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"the body is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "required: the id of a model from /v1/models")
    messages = prompt = None
    if kind == "chat":
        messages = _messages(data.get("messages"))
    else:
        prompt = _prompt(data.get("prompt"))
    max_tokens = _max_tokens(data)
    sampling = _sampling(data, _logprobs(data, kind))
    n = data.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise bad("n", f"{n!r}: an integer from 1 to {MAX_CHOICES}")
    _refuse_unsupported(data)
    stop = _stop(data.get("stop"))
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", f"{stream!r}: true or false")
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise bad("stream_options", f"{options!r}: an object like {{\"include_usage\": true}}")
        if not stream:
            raise bad("stream_options", "only with stream: true")
        include_usage = options.get("include_usage", False)
    priority = data.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not -(2**31) <= priority < 2**31:
        raise bad("priority", f"{priority!r}: an integer (lower is served first, as vLLM takes it; default 0)")
    return Request(kind, model, messages, prompt, max_tokens, stop, stream, include_usage, priority, sampling, n)


# OpenAI's (and vLLM's) parameters this server cannot honour, with the value that changes nothing:
# given anything else they are refused by name rather than silently ignored.
UNSUPPORTED = {
    "logit_bias": ({}, None),
    "best_of": (1, None),
    "echo": (False, None),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


def _refuse_unsupported(data: dict[str, Any]) -> None:
    for field, neutral in UNSUPPORTED.items():
        if field in data and not any(data[field] == value and type(data[field]) is type(value) for value in neutral):
            raise bad(field, f"{data[field]!r}: not supported by this server, which answers text sampled with temperature, top_p, top_k and seed only; leave it out")


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "required: a non-empty list of {\"role\", \"content\"} objects")
    checked = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{n}]", "an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"messages[{n}].role", f"{role!r}: one of {list(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{n}].content", "text parts only ({\"type\": \"text\", \"text\": ...}); this model reads text")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"messages[{n}].content", "a string, or a list of text parts")
        checked.append({"role": role, "content": content})
    return checked


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt", "required: a non-empty string (one prompt per request)")
    return prompt


def _max_tokens(data: dict[str, Any]) -> int | None:
    values = {key: data[key] for key in ("max_completion_tokens", "max_tokens") if data.get(key) is not None}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(key, f"{value!r}: an integer >= 1")
    return values.get("max_completion_tokens", values.get("max_tokens"))


@dataclasses.dataclass(frozen=True)
class Sampling:
    """A sampled request's settings: temperature > 0; top_p in (0, 1]; top_k >= 1, or None (off);
    seed, or None (the engine's shared random stream)."""

    temperature: float  # 0: greedy (a request that is greedy but wants log-probabilities)
    top_p: float
    top_k: int | None
    seed: int | None = None
    logprobs: int | None = None  # alternatives per token to report, or None: no log-probabilities
    penalties: tuple[tuple[str, float], ...] = ()  # (name, value) of the non-neutral penalties and min_p

    @property
    def sampled(self) -> bool:
        return self.temperature > 0


def _sampling(data: dict[str, Any], logprobs: int | None) -> Sampling | None:
    temperature = data.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2):
        raise bad("temperature", f"{temperature!r}: a number from 0 to 2 (0 or absent: greedy)")
    top_p = data.get("top_p")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise bad("top_p", f"{top_p!r}: a number above 0, at most 1")
    top_k = data.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or (top_k < 1 and top_k != -1)):
        raise bad("top_k", f"{top_k!r}: an integer >= 1, or -1 (off)")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", f"{seed!r}: an integer")
    penalties = _penalties(data)
    if not temperature:
        # Greedy: top_p, top_k and min_p change nothing, and a seed is not needed to reproduce it.
        penalties = tuple((name, value) for name, value in penalties if name != "min_p")
        return Sampling(0.0, 1.0, None, None, logprobs, penalties) if logprobs is not None or penalties else None
    return Sampling(float(temperature), float(top_p) if top_p is not None else 1.0, top_k if top_k not in (None, -1) else None, seed, logprobs, penalties)


# name: (neutral value, lowest, highest, what is valid)
PENALTIES = {
    "presence_penalty": (0.0, -2.0, 2.0, "a number from -2 to 2 (0: off)"),
    "frequency_penalty": (0.0, -2.0, 2.0, "a number from -2 to 2 (0: off)"),
    "repetition_penalty": (1.0, 0.01, 10.0, "a number from 0.01 to 10 (1: off; above 1 discourages repeats)"),
    "min_p": (0.0, 0.0, 1.0, "a number from 0 to 1 (0: off)"),
}


def _penalties(data: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    given = []
    for name, (neutral, low, high, valid) in PENALTIES.items():
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise bad(name, f"{value!r}: {valid}")
        if value != neutral:
            given.append((name, float(value)))
    return tuple(given)


def _logprobs(data: dict[str, Any], kind: str) -> int | None:
    """How many alternatives per token the answer reports with its log-probabilities (0: only the
    token's own), or None: none asked. Chat: `logprobs` true and `top_logprobs` 0 to 20;
    completions: `logprobs` 0 to 5 (OpenAI's ranges)."""
    logprobs, top = data.get("logprobs"), data.get("top_logprobs")
    if kind == "chat":
        if logprobs is not None and not isinstance(logprobs, bool):
            raise bad("logprobs", f"{logprobs!r}: true or false")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
            raise bad("top_logprobs", f"{top!r}: an integer from 0 to {MAX_TOP_LOGPROBS}")
        if top and not logprobs:
            raise bad("top_logprobs", f"{top!r}: only with logprobs: true")
        return (top or 0) if logprobs else None
    if top is not None:
        raise bad("top_logprobs", "a chat completions field; here logprobs itself is the count (0 to 5)")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 5):
        raise bad("logprobs", f"{logprobs!r}: an integer from 0 to 5, or null")
    return logprobs


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    values = [stop] if isinstance(stop, str) else stop
    if not isinstance(values, list) or len(values) > MAX_STOP_STRINGS or not all(isinstance(v, str) and 0 < len(v) <= MAX_STOP_LENGTH for v in values):
        raise bad("stop", f"a string or a list of up to {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_LENGTH} characters")
    return values


# -- answers ------------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion(request: Request, response_id: str, answers: list[tuple[str, str, dict[str, Any] | None]], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The whole answer (stream false): one choice per (text, finish reason, log-probabilities
    from `logprobs_of`), in order; the completion tokens over all of them."""
    choices: list[dict[str, Any]] = []
    for index, (text, finish_reason, logprobs) in enumerate(answers):
        if request.kind == "chat":
            choices.append({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish_reason})
        else:
            choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason})
    obj = "chat.completion" if request.kind == "chat" else "text_completion"
    return {"id": response_id, "object": obj, "created": int(time.time()), "model": request.model, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def logprobs_of(request: Request, entries: list[Any], decode: Any, offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's log-probabilities object for `entries` (`TokenLogprob`s), or None when the request
    asked for none. `decode`: token id -> its text; `offset`: the text's length before them
    (completions' `text_offset`)."""
    if request.sampling is None or request.sampling.logprobs is None:
        return None
    if request.kind == "chat":
        def item(token: int, logprob: float) -> dict[str, Any]:
            text = decode(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]}
    texts = [decode(e.token) for e in entries]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{decode(t): lp for t, lp in e.top} for e in entries] if request.sampling.logprobs else None,
        "text_offset": offsets,
    }


def chunk(
    request: Request, response_id: str, text: str | None, finish_reason: str | None, *, first: bool = False, index: int = 0, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One server-sent event's payload (stream true)."""
    if request.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "text_completion"
    payload: dict[str, Any] = {"id": response_id, "object": obj, "created": int(time.time()), "model": request.model, "choices": [choice]}
    if request.include_usage:
        payload["usage"] = None
    return payload


def usage_chunk(request: Request, response_id: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last event with stream_options.include_usage: no choices, the usage."""
    obj = "chat.completion.chunk" if request.kind == "chat" else "text_completion"
    return {"id": response_id, "object": obj, "created": int(time.time()), "model": request.model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
