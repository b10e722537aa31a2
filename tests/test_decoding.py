"""`run`'s sampling controls: checked by name, reproducible with a seed, greedy untouched;
OpenAI's presence and frequency penalties, several samples in one batch, stop strings and
log-probabilities."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tracedoffload import OffloadConfig, offload
from tracedoffload._exceptions import ConfigError
from tracedoffload.decoding import Decoding
from tracedoffload.decoding import AnswerPenalties
from tracedoffload.generation import FINISH_STOP, generate_batched, generate_once
from tracedoffload.models.random_model import ByteTokenizer
from tests.tracing.test_batches import llama

PROMPT = "offloaded sampling"


@pytest.fixture(scope="module")
def offloaded():
    model = llama(260)
    offloader = offload(model, OffloadConfig(num_layers_on_gpu=2))
    yield model
    offloader.detach()


def answer(model, decoding=None) -> str:
    return generate_once(model, ByteTokenizer(), PROMPT, 16, raw=True, ignore_eos=True, decoding=decoding).text


class TestChecks:
    @pytest.mark.parametrize(
        "settings, field",
        [
            ({"temperature": -1}, "temperature"),
            ({"temperature": 1, "top_p": 0}, "top_p"),
            ({"temperature": 1, "top_k": 0}, "top_k"),
            ({"temperature": 1, "min_p": 1.5}, "min_p"),
            ({"repetition_penalty": 0}, "repetition_penalty"),
            ({"temperature": 1, "seed": -3}, "seed"),
            ({"top_k": 5}, "top_k"),  # without sampling it would mean nothing
            ({"seed": 5}, "seed"),
            ({"presence_penalty": 2.5}, "presence_penalty"),
            ({"frequency_penalty": -3}, "frequency_penalty"),
        ],
    )
    def test_each_bad_value_names_its_field(self, settings, field):
        with pytest.raises(ConfigError, match=field):
            Decoding(**settings)

    def test_run_refuses_a_bad_flag_by_name_before_loading(self):
        result = subprocess.run([sys.executable, "-m", "tracedoffload", "run", "--temperature", "0.7", "--min-p", "2"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "min_p" in result.stderr


class TestSampling:
    def test_a_seed_reproduces_a_sample_and_another_seed_differs(self, offloaded):
        first = answer(offloaded, Decoding(temperature=1.5, seed=7))
        assert answer(offloaded, Decoding(temperature=1.5, seed=7)) == first
        assert answer(offloaded, Decoding(temperature=1.5, seed=8)) != first
        assert first != answer(offloaded)  # sampled, not greedy

    def test_narrowing_to_one_candidate_is_greedy(self, offloaded):
        assert answer(offloaded, Decoding(temperature=1.5, top_k=1, seed=1)) == answer(offloaded)

    def test_a_repetition_penalty_changes_the_greedy_answer(self, offloaded):
        assert answer(offloaded, Decoding(repetition_penalty=5.0)) != answer(offloaded)


class TestPenalties:
    def test_presence_and_frequency_subtract_per_answer_token(self):
        """Worked by hand: the answer (after a 2-token prompt) holds token 1 twice and token 3 once."""
        rows = torch.tensor([[0, 3, 1, 1, 0]])  # prompt [0, 3]; answer [1, 1, 0]
        scores = torch.zeros(1, 4)
        out = AnswerPenalties(2, presence=0.5, frequency=0.25)(rows, scores)
        assert out.tolist() == [[-0.75, -1.0, 0.0, 0.0]]  # token 0: 0.5 + 0.25; token 1: 0.5 + 2 * 0.25; 3 only in the prompt

    def test_a_presence_penalty_keeps_a_greedy_answer_from_repeating_a_token(self, offloaded):
        ids = ByteTokenizer()(PROMPT, return_tensors="pt")["input_ids"]

        def answer_ids(decoding: Decoding) -> list[int]:
            with torch.inference_mode():
                out = offloaded.generate(ids, max_new_tokens=12, min_new_tokens=12, eos_token_id=None, pad_token_id=0, **decoding.generate_kwargs(ids.shape[1]))
            return out[0, ids.shape[1] :].tolist()

        plain, penalised = answer_ids(Decoding()), answer_ids(Decoding(presence_penalty=2.0))
        assert len(set(plain)) < len(plain)  # the random model repeats itself...
        assert len(set(penalised)) == len(penalised)  # ...but not once each repeat costs 2 (its logits span far less)

    def test_sampled_penalties_come_before_the_temperature_and_the_filters(self):
        """`generate` runs given processors after its own warpers: so the warpers are ours, in order."""
        kwargs = Decoding(temperature=0.5, top_k=5, top_p=0.9, min_p=0.1, frequency_penalty=1.0).generate_kwargs(7)
        assert [type(p).__name__ for p in kwargs["logits_processor"]] == ["AnswerPenalties", "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper"]
        assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"], kwargs["min_p"]) == (1.0, 1.0, 0, None)


class TestSamples:
    def test_samples_with_a_seed_are_reproducible_and_differ_from_each_other(self, offloaded):
        def samples():
            found = generate_batched(offloaded, ByteTokenizer(), [PROMPT], 12, raw=True, samples=3, decoding=Decoding(temperature=1.5, seed=11))
            return [g.text for g in found]

        first = samples()
        assert len(first) == 3 and len(set(first)) == 3
        assert samples() == first

    def test_each_sample_is_a_traced_generation_served_by_the_same_steps(self, offloaded):
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from tracedoffload import names
        from tracedoffload.offloader import HOOK_ATTR
        from tracedoffload.tracing.sampling import SamplingPolicy
        from tracedoffload.tracing.session import TracingSession

        exporter = InMemorySpanExporter()
        session = TracingSession([exporter], policy=SamplingPolicy(level="token", first_tokens=100))
        session.attach(getattr(offloaded, HOOK_ATTR))
        try:
            found = generate_batched(offloaded, ByteTokenizer(), [PROMPT], 6, session, "tiny", raw=True, samples=2, decoding=Decoding(temperature=1.0, seed=3))
            session.flush(10)
        finally:
            session.shutdown(5)
        spans = exporter.get_finished_spans()
        generations = [s for s in spans if s.name.startswith("text_completion")]
        steps = [s for s in spans if s.name == names.SPAN_STEP]
        assert sorted(s.attributes[names.GEN_AI_USAGE_OUTPUT_TOKENS] for s in generations) == sorted(g.generated_tokens for g in found)
        assert steps and all(s.attributes[names.STEP_SEQUENCES] == 2 for s in steps)
        assert steps[0].attributes[names.STEP_PHASE] == names.PHASE_PREFILL  # one forward for both prompts' prefill


class TestAnswers:
    def test_a_stop_string_ends_the_answer_before_it(self, default_model):
        model, tokenizer = default_model.model, default_model.tokenizer
        prompt = "List the numbers from 1 to 10, separated by commas."
        plain = generate_once(model, tokenizer, prompt, 24)
        assert "," in plain.text
        stopped = generate_once(model, tokenizer, prompt, 24, stop=[","])
        assert stopped.text == plain.text[: plain.text.index(",")]
        assert stopped.finish_reason == FINISH_STOP and stopped.stop_string == "," and stopped.stop_token is None
        assert stopped.generated_tokens < plain.generated_tokens

    def test_stop_strings_need_a_tokenizer_with_a_vocabulary(self, offloaded):
        with pytest.raises(ConfigError, match="stop=.*ByteTokenizer"):
            generate_once(offloaded, ByteTokenizer(), PROMPT, 4, raw=True, stop=["x"])

    def test_log_probabilities_are_the_models_own_and_greedy_picks_the_best(self, offloaded):
        found = generate_once(offloaded, ByteTokenizer(), PROMPT, 8, raw=True, ignore_eos=True, logprobs=3)
        assert len(found.logprobs) == found.generated_tokens == 8
        for entry in found.logprobs:
            assert len(entry.top) == 3 and entry.top[0] == (entry.token, entry.logprob)  # greedy: its token is the most likely
            assert entry.logprob <= 0 and [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)

    def test_run_prints_samples_and_log_probabilities_as_json(self, in_tmp_dir):
        import json

        command = [sys.executable, "-m", "tracedoffload", "run", "--model", "random", "--raw", "--prompt", PROMPT, "--max-new-tokens", "4", "--no-progress",
                   "--temperature", "1", "--sampling-seed", "2", "--num-samples", "2", "--logprobs", "1", "--json", "--trace-level", "off"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert [s["generated_tokens"] for s in summary["samples"]] == [4, 4] and summary["generated_tokens"] == 8
        assert all(len(s["logprobs"]) == 4 and len(s["logprobs"][0]["top_logprobs"]) == 1 for s in summary["samples"])

    @pytest.mark.parametrize(
        "flags, field",
        [
            (["--num-samples", "2"], "num_samples"),
            (["--num-samples", "9", "--temperature", "1"], "num_samples"),
            (["--num-samples", "2", "--temperature", "1", "--early-exit", "2"], "num_samples"),
            (["--stop", ""], "stop"),
            (["--logprobs", "-1"], "logprobs"),
        ],
    )
    def test_run_refuses_bad_answer_flags_by_name_before_loading(self, flags, field):
        result = subprocess.run([sys.executable, "-m", "tracedoffload", "run", *flags], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and f"{field}=" in result.stderr and "loading" not in result.stderr
