"""`tracedoffload serve` as a user runs it: a real server process on loopback (the default model,
offloaded with the balanced preset, traced), called with the official `openai` client and with
plain HTTP; stopped by its process id."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import openai
import pytest

from tracedoffload.generation import generate_once
from tests.servers import start_serve

MODEL = "SmolLM2-135M-Instruct.Q4_1"
QUESTIONS = ["What is the capital of France?", "Say yes.", "List three colors.", "Name a planet.", "What is two plus two?"]


@pytest.fixture(scope="module")
def server(default_model_xdg, tmp_path_factory):
    """One server for the module: the default model from the session's converted cache."""
    env = {**os.environ, "XDG_CACHE_HOME": str(default_model_xdg[0])}
    flags = ["--trace-level", "token", "--max-batch-size", "4", "--max-queue", "2", "--max-body-bytes", "65536", "--max-context-tokens", "512"]
    process, base = start_serve(flags, tmp_path_factory.mktemp("serve") / "serve.log", env, ready_timeout_s=240)
    yield base, process
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(base: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    request = urllib.request.Request(base + path, data=body, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


class TestTheOpenAIClient:
    def test_models_health_and_ready(self, server, client):
        assert [m.id for m in client.models.list()] == [MODEL]
        for path in ("/health", "/ready"):
            with urllib.request.urlopen(server[0] + path, timeout=5) as response:
                assert response.status == 200

    def test_a_chat_answer_equals_the_prompt_run_alone(self, client, default_model):
        """Greedy: the served answer is what `generate` gives the same chat alone, with its
        finish reason and usage."""
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=24)
        alone = generate_once(default_model.model, default_model.tokenizer, QUESTIONS[0], 24)
        assert answer.choices[0].message.content == alone.text
        assert answer.choices[0].finish_reason == alone.finish_reason == "stop"
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (alone.prompt_tokens, alone.generated_tokens)

    def test_concurrent_requests_each_equal_their_prompt_alone(self, client, default_model):
        """Five requests at once (more than the batch of 4: one waits and joins when a place
        frees), each answer equal to its prompt run alone."""
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda q: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=16), QUESTIONS))
        for question, answer in zip(QUESTIONS, answers):
            alone = generate_once(default_model.model, default_model.tokenizer, question, 16)
            assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (alone.text, alone.finish_reason), question

    def test_streaming_assembles_the_same_answer_and_ends_with_usage(self, client):
        whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[2]}], max_tokens=12)
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[2]}], max_tokens=12, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    def test_the_stream_ends_with_done(self, server):
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}).encode()
        request = urllib.request.Request(server[0] + "/v1/chat/completions", data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line for line in response.read().decode().split("\n\n") if line]
        assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)

    def test_a_sampled_request_is_served(self, client):
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[2]}], max_tokens=12, temperature=0.8, top_p=0.95)
        assert answer.choices[0].message.content and answer.usage.completion_tokens > 0

    def test_a_seed_reproduces_a_sampled_answer_alone_and_beside_others(self, client):
        def ask(seed: int) -> str:
            answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[2]}], max_tokens=12, temperature=1.0, seed=seed)
            return answer.choices[0].message.content

        alone = ask(5)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            beside = [pool.submit(ask, 5), pool.submit(ask, 6), pool.submit(ask, 5)]
            answers = [future.result() for future in beside]
        assert answers[0] == answers[2] == alone

    def test_n_choices_of_one_chat(self, client):
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[3]}], max_tokens=6, n=2, temperature=0.9, seed=2)
        assert [c.index for c in answer.choices] == [0, 1] and all(c.message.content for c in answer.choices)
        assert 2 <= answer.usage.completion_tokens <= 12  # both choices' tokens, up to 6 each

    def test_chat_log_probabilities_plain_and_streamed(self, client):
        messages = [{"role": "user", "content": QUESTIONS[0]}]
        answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, logprobs=True, top_logprobs=2)
        content = answer.choices[0].logprobs.content
        assert len(content) == answer.usage.completion_tokens and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in content)
        assert "".join(e.token for e in content) == answer.choices[0].message.content or answer.choices[0].finish_reason == "stop"
        assert all(max(t.logprob for t in e.top_logprobs) <= e.logprob + 1e-6 for e in content)  # greedy: nothing beats the chosen
        streamed = [e for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, logprobs=True, top_logprobs=2, stream=True)
                    if chunk.choices and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content]
        assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]

    def test_completions_and_a_stop_string(self, client):
        plain = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=8)
        assert plain.choices[0].text and plain.usage.prompt_tokens > 0
        cut = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=8, stop=[","])
        assert "," not in cut.choices[0].text and plain.choices[0].text.startswith(cut.choices[0].text)
        assert cut.choices[0].finish_reason == "stop"


class TestBadRequests:
    def test_an_unknown_model_is_404(self, client):
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
        assert caught.value.body["param"] == "model" and MODEL in caught.value.body["message"]

    @pytest.mark.parametrize(
        "body, param",
        [
            ({"model": MODEL}, "messages"),
            ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
            ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
            ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, "max_tokens"),
            ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 600}]}, "messages"),
            ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop"),
            ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
            ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
            ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 1, "top_p": 0}, "top_p"),
            ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 1, "top_k": 0}, "top_k"),
            ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "presence_penalty": 2.5}, "presence_penalty"),
            ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 30}, "top_logprobs"),
            ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
            ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 10}}, "logit_bias"),
            ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ],
    )
    def test_each_bad_field_is_a_400_naming_it(self, server, body, param):
        status, _, answer = post(server[0], "/v1/chat/completions", json.dumps(body).encode())
        assert status == 400 and answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"

    def test_an_unsupported_parameter_at_its_neutral_value_is_accepted(self, client):
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, presence_penalty=0, frequency_penalty=0.0, logprobs=False)
        assert answer.choices[0].finish_reason in ("stop", "length")

    def test_not_json_is_a_400_and_a_huge_body_a_413(self, server):
        status, _, answer = post(server[0], "/v1/chat/completions", b"{not json")
        assert status == 400 and "not JSON" in answer["error"]["message"]
        status, _, answer = post(server[0], "/v1/chat/completions", b"x" * 70000)
        assert status == 413 and "65536" in answer["error"]["message"]

    def test_more_requests_than_the_engine_admits_get_429_with_retry_after(self, server):
        """Batch 4 plus a queue of 2: of 9 long requests at once, the ones beyond 6 are refused
        at once with 429 and Retry-After; the others complete."""
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Count slowly to one hundred."}], "max_tokens": 40}).encode()
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            results = list(pool.map(lambda _: post(server[0], "/v1/chat/completions", body), range(9)))
        refused = [r for r in results if r[0] == 429]
        assert len(refused) == 3 and all({k.lower(): v for k, v in r[1].items()}.get("retry-after") == "1" for r in refused)
        assert all(r[2]["error"]["type"] == "rate_limit_error" for r in refused)
        assert sorted(r[0] for r in results if r[0] != 429) == [200] * 6


class TestTelemetry:
    def test_metrics_count_the_requests_and_their_steps(self, server, client):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        time.sleep(1)  # the telemetry thread rests 0.25 s between batches
        with urllib.request.urlopen(server[0] + "/metrics", timeout=5) as response:
            text = response.read().decode()
        lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")}
        assert lines[f'gen_ai_server_request_duration_seconds_count{{model="{MODEL}"}}'] >= 1
        assert lines[f'tracedoffload_steps_total{{model="{MODEL}"}}'] >= 4
        assert lines[f'tracedoffload_generated_tokens_total{{model="{MODEL}"}}'] >= 4
