"""The serving engine in this process, over a tiny random Llama offloaded and traced, behind a real
uvicorn server on loopback: outputs equal plain greedy `generate` for requests arriving while
others run, and a forward that fails takes the engine down cleanly: every waiting client gets a
500 at once, /ready turns 503, new requests are refused; nobody hangs."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import contextlib
import threading
import time
from typing import Any

import httpx
import pytest
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
import torch
import uvicorn

from tracedoffload import OffloadConfig, offload
from tracedoffload.models.random_model import ByteTokenizer
from tracedoffload.serve.app import create_app
from tracedoffload.serve.engine import Engine, EngineSettings
from tracedoffload.serve.metrics import ServerMetrics
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import TracingSession
from tests.servers import free_port
from tests.tracing.test_batches import llama as tiny_llama


def llama():
    """The tests' tiny random Llama, its vocabulary holding the byte tokenizer's ids (bytes, pad, bos, eos)."""
    return tiny_llama(vocab_size=260)


# The reference the served answers are checked against, built at import, before any engine runs:
# its weights come from the global torch generator (seeded 0), which a running engine's manager
# thread reseeds when it starts generating, so a model built beside a running engine may get
# other weights than the served one (an intermittent failure this once had).
REFERENCE = llama()


PROMPTS = ["offloading", "a longer prompt about layers and copies", "hi", "continuous batching joins and leaves", "kv"]


class Served:
    """Engine + app + uvicorn on a thread, with the server's metrics in `registry`; `stop()` ends
    all three. `app_options` go to `create_app` (api_key, record_content)."""

    def __init__(self, settings: EngineSettings, **app_options: Any) -> None:
        self.model = llama()
        self.tokenizer = ByteTokenizer()
        self.offloader = offload(self.model, OffloadConfig(num_layers_on_gpu=2))
        self.exporter = InMemorySpanExporter()
        self.session = TracingSession([self.exporter], policy=SamplingPolicy(level="token"))
        self.session.attach(self.offloader)
        self.registry = CollectorRegistry()
        self.metrics = ServerMetrics("tiny", self.registry, NoOpMeterProvider())
        self.engine = Engine(self.model, self.tokenizer, "tiny", settings, self.session, metrics=self.metrics)
        self.engine.start()
        self.metrics.watch(self.engine)
        self.port = free_port()
        app = create_app(self.engine, registry=self.registry, metrics=self.metrics, **app_options)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{self.port}"

    def server_loop_call(self, function: Any) -> None:
        """Run `function` on the server's event loop (the engine's asyncio side lives there)."""
        async def call() -> None:
            function()

        asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def complete(self, prompt: str, max_tokens: int = 8) -> httpx.Response:
        return httpx.post(self.base + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens}, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.stop()
        self.session.shutdown(5)
        self.offloader.detach()


@pytest.fixture
def served():
    running = Served(EngineSettings(max_batch_size=2, max_batch_tokens=32, max_context_tokens=128, max_queue=8, default_max_tokens=8))
    yield running
    running.stop()


def alone(prompt: str, max_tokens: int) -> list[int]:
    model, tokenizer = REFERENCE, ByteTokenizer()
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()


def test_requests_arriving_mid_generation_equal_greedy_alone(served):
    """Five requests, staggered so that each arrives while others are decoding, through a batch
    of 2 with 32 tokens per forward (long prompts chunked): each equals `generate` alone."""
    def call(n: int) -> str:
        time.sleep(0.05 * n)
        response = served.complete(PROMPTS[n], 10)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        texts = list(pool.map(call, range(5)))
    assert texts == [served.tokenizer.decode(alone(p, 10)) for p in PROMPTS]
    served.session.drain(10)
    stats = served.session.snapshot()
    assert stats["generations"] == 5 and stats["generated_tokens"] == 50
    assert stats["steps_by_phase"].get("mixed", 0) + stats["steps_by_phase"].get("prefill_chunk", 0) > 0
    served.session.flush(10)
    requests = [s for s in served.exporter.get_finished_spans() if s.name == "text_completion tiny"]
    assert len(requests) == 5
    assert all(s.attributes["generation.queue_ns"] >= 0 and s.attributes["gen_ai.response.finish_reasons"] == ("length",) for s in requests)
    assert max(s.attributes["generation.queue_ns"] for s in requests) > 0  # with a batch of 2, some waited in line


def test_a_failing_forward_fails_every_waiting_request_and_the_engine_goes_unready(served):
    assert served.complete("warm").status_code == 200
    layer = served.model.model.layers[1]

    release = threading.Event()

    def fail(module, args):
        # Held until all three requests are in the engine or in line, so that all three are
        # waiting on it when it fails (whatever the host's speed).
        release.wait(60)
        raise RuntimeError("injected: a forward that fails")

    hook = layer.register_forward_pre_hook(fail)
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(served.complete, p) for p in PROMPTS[:3]]
            deadline = time.monotonic() + 60
            while served.engine.admission.inside + served.engine.admission.waiting < 3:
                assert time.monotonic() < deadline, "the requests never all arrived"
                time.sleep(0.02)
            release.set()
            responses = [f.result(timeout=60) for f in pending]  # no client hangs
        assert [r.status_code for r in responses] == [500] * 3
        assert all(r.json()["error"]["type"] == "server_error" and "Traceback" not in r.text for r in responses)
        ready = httpx.get(served.base + "/ready", timeout=5)
        assert ready.status_code == 503 and "injected" in ready.json()["reason"]
        refused = served.complete("after")
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"
    finally:
        release.set()
        hook.remove()


@contextlib.contextmanager
def held(served: Served, gate: threading.Event):
    """The engine waits inside every forward while `gate` is clear; released on leaving."""
    def hold(module: Any, args: Any) -> None:
        gate.wait(60)  # returns None whatever happens: a pre-hook's value would replace the layer's inputs

    hook = served.model.model.layers[0].register_forward_pre_hook(hold)
    try:
        yield
    finally:
        gate.set()
        hook.remove()


def wait_until_its_place_frees(served: Served, what: str) -> None:
    """The request leaves the engine while the engine is still held (so it cannot have finished)."""
    deadline = time.monotonic() + 30
    while served.engine.admission.inside:
        assert time.monotonic() < deadline, f"the {what} request kept its place"
        time.sleep(0.05)


def cancelled_span(served: Served) -> Any:
    """The one request's span, which ended cancelled."""
    served.session.flush(10)
    (span,) = [s for s in served.exporter.get_finished_spans() if s.name == "text_completion tiny"]
    assert span.attributes["gen_ai.response.finish_reasons"] == ("cancelled",)
    return span


def test_a_stream_closed_by_its_client_is_cancelled_in_the_engine(served):
    """The client reads the first event of a long stream and goes away while the engine is
    held mid-generation: the request leaves the engine (its place is free) and its generation
    ends as cancelled, without waiting for its 100 tokens."""
    gate = threading.Event()
    gate.set()
    with held(served, gate):
        body = {"model": "tiny", "prompt": "a long one", "max_tokens": 100, "stream": True}
        with httpx.Client(timeout=30) as client, client.stream("POST", served.base + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            next(response.iter_lines())
            gate.clear()  # the engine now waits inside its next forward
        # The connection is closed: the server notices and cancels.
        wait_until_its_place_frees(served, "cancelled")
    assert cancelled_span(served).attributes["gen_ai.usage.output_tokens"] < 100


def test_a_request_whose_client_left_is_cancelled_in_the_engine(served):
    """Not streamed: the client gives up (a timeout) while the engine is held; the server notices
    and cancels the request rather than finish it for nobody."""
    with held(served, threading.Event()):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.base + "/v1/completions", json={"model": "tiny", "prompt": "a long one", "max_tokens": 100}, timeout=httpx.Timeout(30, read=1.0))
        wait_until_its_place_frees(served, "abandoned")
    cancelled_span(served)


def test_sampled_and_greedy_requests_share_a_batch_and_greedy_stays_greedy(served):
    """Sampling is per request: at temperature 2 a completion departs from the greedy one, and
    greedy requests served in the same batches still equal `generate` alone."""
    def call(n: int) -> httpx.Response:
        body = {"model": "tiny", "prompt": PROMPTS[n % 2], "max_tokens": 16}
        if n % 2:
            body["temperature"] = 2.0
        return httpx.post(served.base + "/v1/completions", json=body, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = [r.json()["choices"][0]["text"] for r in pool.map(call, range(4))]
    greedy = [served.tokenizer.decode(alone(PROMPTS[0], 16)), served.tokenizer.decode(alone(PROMPTS[1], 16))]
    assert answers[0] == answers[2] == greedy[0]
    assert answers[1] != greedy[1] and answers[3] != greedy[1]


def test_a_seeded_sample_is_the_same_alone_and_in_any_batch(served):
    """The same seed draws the same completion whether the request runs alone or shares its steps
    with others (greedy, sampled unseeded, seeded differently) arriving at other times; another
    seed draws another."""
    def seeded(seed: int, prompt: str = PROMPTS[1]) -> str:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 1.5, "seed": seed}
        response = httpx.post(served.base + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    first = seeded(7)

    def crowd(n: int) -> Any:
        time.sleep(0.03 * n)
        if n == 0:
            return seeded(7)
        if n == 1:
            return served.complete(PROMPTS[3], 12)
        if n == 2:
            return httpx.post(served.base + "/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 1.0}, timeout=60)
        return seeded(8, PROMPTS[2])

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        crowded = list(pool.map(crowd, range(4)))
    assert crowded[0] == first
    assert seeded(7) == first
    assert seeded(8) != first
    assert first != served.tokenizer.decode(alone(PROMPTS[1], 16))  # it was sampled, not greedy


def test_greedy_only_refuses_sampling_by_name_and_serves_greedy():
    running = Served(EngineSettings(max_batch_size=2, max_batch_tokens=32, max_context_tokens=128, max_queue=8, default_max_tokens=8, sampling=False))
    try:
        refused = httpx.post(running.base + "/v1/completions", json={"model": "tiny", "prompt": "hi", "temperature": 0.5}, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "temperature" and "--greedy-only" in refused.text
        logprobs = httpx.post(running.base + "/v1/completions", json={"model": "tiny", "prompt": "hi", "logprobs": 1}, timeout=30)
        assert logprobs.status_code == 400 and logprobs.json()["error"]["param"] == "logprobs" and "--greedy-only" in logprobs.text
        chat = httpx.post(running.base + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages" and "no chat template" in chat.text
        served = running.complete(PROMPTS[0], 10)
        assert served.json()["choices"][0]["text"] == running.tokenizer.decode(alone(PROMPTS[0], 10))
    finally:
        running.stop()


class TestChoices:
    """`n` samples of one prompt: each its own sequence, span and (derived) seed."""

    def test_n_greedy_choices_each_equal_the_prompt_alone(self, served):
        response = httpx.post(served.base + "/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 6, "n": 3}, timeout=60)
        answer = response.json()
        assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
        assert {c["text"] for c in answer["choices"]} == {served.tokenizer.decode(alone(PROMPTS[0], 6))}
        assert answer["usage"]["completion_tokens"] == 18
        served.session.flush(10)
        spans = [s for s in served.exporter.get_finished_spans() if s.attributes.get("request.id") == response.headers["x-request-id"]]
        assert sorted(s.attributes["request.choice"] for s in spans) == [0, 1, 2]

    def test_seeded_choices_differ_and_come_back_the_same(self, served):
        def ask(n: int) -> list[str]:
            body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 10, "n": n, "temperature": 1.5, "seed": 11}
            return [c["text"] for c in httpx.post(served.base + "/v1/completions", json=body, timeout=60).json()["choices"]]

        three = ask(3)
        assert len(set(three)) == 3 and ask(3) == three
        assert ask(1) == three[:1]  # choice 0 has the request's own seed

    def test_streamed_choices_carry_their_index_and_assemble_the_plain_answer(self, served):
        body = {"model": "tiny", "prompt": PROMPTS[2], "max_tokens": 8, "n": 2, "temperature": 1.5, "seed": 4}
        plain = [c["text"] for c in httpx.post(served.base + "/v1/completions", json=body, timeout=60).json()["choices"]]
        texts, finishes = ["", ""], [[], []]
        with httpx.stream("POST", served.base + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        texts[choice["index"]] += choice["text"]
                        if choice["finish_reason"]:
                            finishes[choice["index"]].append(choice["finish_reason"])
        assert texts == plain and finishes == [["length"], ["length"]]

    def test_n_beyond_the_limit_is_refused_by_name(self, served):
        response = httpx.post(served.base + "/v1/completions", json={"model": "tiny", "prompt": "x", "n": 9}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == "n"

    def test_a_request_whose_choices_do_not_fit_the_line_is_refused_whole(self, served):
        """Batch 2 + a line of 8 = 10 places: 11 choices cannot be; with n=8 beside 3 held, the
        line refuses and every place the request took is given back."""
        gate = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(3) as pool, held(served, gate):
            futures = [pool.submit(served.complete, f"hold {n}", 2) for n in range(3)]
            deadline = time.monotonic() + 30
            while served.engine.in_flight < 3:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            refused = httpx.post(served.base + "/v1/completions", json={"model": "tiny", "prompt": "x", "n": 8}, timeout=30)
            assert served.engine.in_flight == 3
            gate.set()
            assert all(f.result().status_code == 200 for f in futures)
        assert refused.status_code == 429


def reference_logprobs(prompt: str, tokens: list[int]) -> list[torch.Tensor]:
    """The model's own log-softmax before each of `tokens` (resident, one forward over it all)."""
    model, tokenizer = REFERENCE, ByteTokenizer()
    ids = torch.tensor([tokenizer.encode(prompt) + tokens])
    with torch.inference_mode():
        logits = model(ids).logits[0].float()
    start = ids.shape[1] - len(tokens) - 1
    return [torch.log_softmax(logits[start + i], dim=-1) for i in range(len(tokens))]


class TestLogprobs:
    """The model's own log-probabilities, whatever the sampling settings (greedy is a top-k of 1
    in this engine, and the manager's own would read 0 for every token)."""

    def ask(self, served, **fields) -> dict:
        body = {"model": "tiny", "prompt": PROMPTS[3], "max_tokens": 6, **fields}
        response = httpx.post(served.base + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    def test_greedy_tokens_carry_the_model_s_log_probabilities_and_alternatives(self, served):
        choice = self.ask(served, logprobs=3)
        tokens = alone(PROMPTS[3], 6)
        reference = reference_logprobs(PROMPTS[3], tokens)
        logprobs = choice["logprobs"]
        assert logprobs["tokens"] == [served.tokenizer.decode([t]) for t in tokens]
        for n, (token, lp) in enumerate(zip(tokens, logprobs["token_logprobs"])):
            assert abs(lp - float(reference[n][token])) < 1e-3 and lp < 0
            # Greedy: no alternative beats the chosen token. (Keyed by text, as OpenAI's are:
            # byte tokens that decode alike share a key, so fewer than 3 may show.)
            best = logprobs["top_logprobs"][n].values()
            assert 1 <= len(best) <= 3 and max(best) <= lp + 1e-6
        assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])

    def test_a_seeded_sample_is_the_same_with_them_and_they_are_the_model_s(self, served):
        settings = {"temperature": 1.5, "seed": 21}
        plain = self.ask(served, **settings)
        traced = self.ask(served, **settings, logprobs=0)
        assert traced["text"] == plain["text"] and traced["logprobs"]["top_logprobs"] is None
        # Sampled at a top-k of 1, the tokens are greedy's (known ids), and their log-probabilities
        # are still the model's own, not the warped distribution's (which would say 0).
        narrowed = self.ask(served, temperature=1.5, top_k=1, seed=21, logprobs=0)["logprobs"]["token_logprobs"]
        tokens = alone(PROMPTS[3], 6)
        reference = reference_logprobs(PROMPTS[3], tokens)
        assert all(abs(lp - float(reference[n][t])) < 1e-3 and lp < 0 for n, (t, lp) in enumerate(zip(tokens, narrowed)))

    def test_streamed_log_probabilities_add_up_to_the_plain_answer_s(self, served):
        plain = self.ask(served, logprobs=2)["logprobs"]
        streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        body = {"model": "tiny", "prompt": PROMPTS[3], "max_tokens": 6, "logprobs": 2, "stream": True}
        with httpx.stream("POST", served.base + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        for key in streamed:
                            streamed[key] += (choice["logprobs"] or {}).get(key) or []
        assert streamed == plain

    @pytest.mark.parametrize(
        "path, fields, param",
        [
            ("/v1/completions", {"logprobs": 6}, "logprobs"),
            ("/v1/completions", {"logprobs": True}, "logprobs"),
            ("/v1/completions", {"top_logprobs": 2}, "top_logprobs"),
        ],
    )
    def test_bad_values_are_refused_by_name(self, served, path, fields, param):
        response = httpx.post(served.base + path, json={"model": "tiny", "prompt": "x", **fields}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def greedy_with(prompt: str, max_tokens: int, adjust: Any) -> list[int]:
    """Greedy decoding, one full forward per token, the logits changed by `adjust(logits, prompt ids,
    answer so far)` before the argmax: what a penalty should do, computed the plain way."""
    model, tokenizer = REFERENCE, ByteTokenizer()
    prompt_ids, answer = tokenizer.encode(prompt), []
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = model(torch.tensor([prompt_ids + answer])).logits[0, -1].float()
            answer.append(int(adjust(logits.clone(), prompt_ids, answer).argmax()))
    return answer


class TestPenalties:
    def answer(self, served, **fields) -> str:
        response = httpx.post(served.base + "/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 12, **fields}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    def test_a_repetition_penalty_does_what_generate_s_does(self, served):
        model, tokenizer = REFERENCE, ByteTokenizer()
        ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
        with torch.inference_mode():
            expected = model.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=3.0, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        assert self.answer(served, repetition_penalty=3.0) == tokenizer.decode(expected) != tokenizer.decode(alone(PROMPTS[0], 12))

    def test_presence_and_frequency_penalties_follow_openai_s_rule(self, served):
        def openai_rule(logits, prompt_ids, answer):
            for token, count in collections.Counter(answer).items():
                logits[token] -= 1.5 + 0.75 * count
            return logits

        expected = served.tokenizer.decode(greedy_with(PROMPTS[0], 12, openai_rule))
        assert self.answer(served, presence_penalty=1.5, frequency_penalty=0.75) == expected != served.tokenizer.decode(alone(PROMPTS[0], 12))

    def test_min_p_of_one_keeps_only_the_most_likely_token(self, served):
        assert self.answer(served, temperature=1.5, min_p=1.0) == served.tokenizer.decode(alone(PROMPTS[0], 12))

    @pytest.mark.parametrize("field, value", [("presence_penalty", 3), ("frequency_penalty", -2.5), ("repetition_penalty", 0), ("min_p", 1.5)])
    def test_out_of_range_values_are_refused_by_name(self, served, field, value):
        response = httpx.post(served.base + "/v1/completions", json={"model": "tiny", "prompt": "x", field: value}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == field
