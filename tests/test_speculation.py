"""Speculative decoding over the offloaded model: the same greedy output in fewer offloaded
forwards, and traced: verify steps with their drafted and kept tokens, the draft model's forwards
under the steps verifying them, and the statistics from those spans."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from transformers import LlamaConfig, LlamaForCausalLM

from tracedoffload import OffloadConfig, names, offload
from tracedoffload._exceptions import ConfigError
from tracedoffload.generation import generate_once
from tracedoffload.models.random_model import ByteTokenizer
from tracedoffload.speculation import Speculation, check_early_exit
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import TracingSession
from tests.tracing.test_batches import llama

# Repetitive, so that prompt lookup finds matches; the byte tokenizer makes it ids 0-255.
PROMPT = "the cat sat on the mat. the cat sat on the mat. the cat sat on the"


def traced_generation(model, speculation=None, max_new_tokens=24, residency="interleaved"):
    """`generate_once` on `model` offloaded (2 of 4 layers resident) and traced; returns the
    generation, the step spans in order, every span, and the statistics."""
    offloader = offload(model, OffloadConfig(num_layers_on_gpu=2, residency=residency))
    exporter = InMemorySpanExporter()
    session = TracingSession([exporter], policy=SamplingPolicy(level="layer", first_tokens=1000))
    session.attach(offloader)
    try:
        generation = generate_once(model, ByteTokenizer(), PROMPT, max_new_tokens, session, "tiny", raw=True, ignore_eos=True, speculation=speculation)
        session.flush(10)
        spans = exporter.get_finished_spans()
        stats = session.snapshot()
    finally:
        session.shutdown(5)
        offloader.detach()
    steps = sorted((s for s in spans if s.name == names.SPAN_STEP), key=lambda s: s.attributes[names.STEP_INDEX])
    return generation, steps, spans, stats


@pytest.fixture(scope="module")
def plain():
    return traced_generation(llama(260))


class TestPromptLookup:
    def test_same_greedy_output_in_fewer_forwards(self, plain):
        speculated = traced_generation(llama(260), Speculation(prompt_lookup_tokens=4))
        assert speculated[0].text == plain[0].text and speculated[0].generated_tokens == 24
        assert speculated[3]["steps"] < plain[3]["steps"] == 24

    def test_each_verify_step_says_what_it_drafted_and_kept_and_the_counts_add_up(self):
        generation, steps, _, stats = traced_generation(llama(260), Speculation(prompt_lookup_tokens=4))
        verified = [s.attributes for s in steps if names.STEP_DRAFTED_TOKENS in s.attributes]
        assert verified and all(0 <= a[names.STEP_ACCEPTED_TOKENS] <= a[names.STEP_DRAFTED_TOKENS] for a in verified)
        for a in verified:
            assert a[names.STEP_GENERATED_TOKENS] == a[names.STEP_ACCEPTED_TOKENS] + 1
        # Every token the generation made is on exactly one step; each step starts where the
        # cache stood after the previous one's kept tokens (the crop included).
        assert sum(s.attributes[names.STEP_GENERATED_TOKENS] for s in steps) == generation.generated_tokens == stats["generated_tokens"]
        prompt = generation.prompt_tokens
        for before, after in zip(steps, steps[1:]):
            a = before.attributes
            kept = a[names.STEP_GENERATED_TOKENS] + (prompt - 1 if a[names.STEP_PHASE] == names.PHASE_PREFILL else 0)
            assert after.attributes[names.STEP_POSITION] == a[names.STEP_POSITION] + kept
            assert a[names.STEP_KV_TOKENS] == a[names.STEP_POSITION] + kept
        assert stats["drafted_tokens"] == sum(a[names.STEP_DRAFTED_TOKENS] for a in verified)
        assert stats["accepted_tokens"] == sum(a[names.STEP_ACCEPTED_TOKENS] for a in verified)
        assert stats["acceptance_rate"] == round(stats["accepted_tokens"] / stats["drafted_tokens"], 4)


def draft_llama(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A smaller Llama with the tiny one's vocabulary; with seed 0 its layers are the tiny
    Llama's first ones."""
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, vocab_size=260,
        intermediate_size=128, max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def test_the_metrics_count_what_the_spans_say(plain):
    """The drafted and kept counters hold the session's statistics (read from the step spans)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from tracedoffload.metrics import OffloadMetrics

    model = llama(260)
    offloader = offload(model, OffloadConfig(num_layers_on_gpu=2))
    registry = CollectorRegistry()
    session = TracingSession([], policy=SamplingPolicy(level="token"))
    OffloadMetrics("tiny", registry=registry).subscribe(session)
    session.attach(offloader)
    try:
        generate_once(model, ByteTokenizer(), PROMPT, 24, session, "tiny", raw=True, ignore_eos=True, speculation=Speculation(prompt_lookup_tokens=4))
        session.drain(10)
        stats = session.snapshot()
    finally:
        session.shutdown(5)
        offloader.detach()
    text = generate_latest(registry).decode()
    drafted = f'{names.DRAFTED_TOKENS.prometheus}{{model="tiny"}} {float(stats["drafted_tokens"])}'
    accepted = f'{names.ACCEPTED_TOKENS.prometheus}{{model="tiny"}} {float(stats["accepted_tokens"])}'
    assert stats["drafted_tokens"] > 0 and drafted in text and accepted in text


class TestDraftModel:
    def test_the_model_itself_as_its_draft_keeps_every_drafted_token(self, plain):
        """A draft equal to the model (the same seeded weights, resident) drafts what the model
        would say: the output is the same, every drafted token is kept, and each step's draft
        forwards are `draft.forward` spans under it, inside its time."""
        generation, steps, spans, stats = traced_generation(llama(260), Speculation(draft_model=llama(260), draft_tokens=3))
        assert generation.text == plain[0].text
        assert stats["drafted_tokens"] > 0 and stats["accepted_tokens"] == stats["drafted_tokens"] and stats["acceptance_rate"] == 1.0
        drafts = [s for s in spans if s.name == names.SPAN_DRAFT]
        assert len(drafts) == stats["draft_forwards"] > 0
        by_step = {s.context.span_id: s for s in steps}
        for draft in drafts:
            step = by_step[draft.parent.span_id]
            assert step.start_time <= draft.start_time <= draft.end_time <= step.end_time
        assert sum(s.attributes.get(names.STEP_DRAFT_FORWARDS, 0) for s in steps) == len(drafts)

    def test_a_different_draft_changes_nothing_in_the_output(self, plain):
        generation, _, _, stats = traced_generation(llama(260), Speculation(draft_model=draft_llama(seed=3), draft_tokens=4, schedule="heuristic"))
        assert generation.text == plain[0].text and stats["drafted_tokens"] > 0

    def test_a_draft_with_another_vocabulary_is_refused_by_name(self):
        with pytest.raises(ConfigError, match="draft_model"):
            with Speculation(draft_model=llama(256)).applied(llama(260)):
                pass


class TestEarlyExit:
    """The model drafts with its own first layers, kept resident."""

    @pytest.fixture(scope="class")
    def early(self):
        return traced_generation(llama(260), Speculation(early_exit_layers=2, draft_tokens=3), residency="first")

    def test_same_greedy_output_and_drafts_traced_as_drafts_not_steps(self, plain, early):
        """Drafting forwards run the model's own hooks: each is a `draft.forward` span under the
        step verifying it, and every step still computes every layer (no draft became a step)."""
        generation, steps, spans, stats = early
        assert generation.text == plain[0].text and generation.generated_tokens == 24
        drafts = [s for s in spans if s.name == names.SPAN_DRAFT]
        assert len(drafts) == stats["draft_forwards"] == sum(s.attributes.get(names.STEP_DRAFT_FORWARDS, 0) for s in steps) > 0
        by_step = {s.context.span_id: s for s in steps}
        for draft in drafts:
            step = by_step[draft.parent.span_id]
            assert step.start_time <= draft.start_time <= draft.end_time <= step.end_time
        for step in steps:
            assert all(ns > 0 for ns in step.attributes[names.STEP_LAYERS_COMPUTE_NS]), step.attributes[names.STEP_INDEX]
        assert stats["drafted_tokens"] > 0 and sum(s.attributes[names.STEP_GENERATED_TOKENS] for s in steps) == 24

    def test_the_drafts_copy_nothing_more(self, plain, early):
        """The draft runs resident layers only: no step, its drafts included, copies more than a
        plain step (each offloaded layer once), and so fewer steps copy less in all."""
        most = max(s.attributes[names.STEP_TRANSFER_BYTES] for s in plain[1])
        assert max(s.attributes[names.STEP_TRANSFER_BYTES] for s in early[1]) <= most
        assert early[3]["steps"] < plain[3]["steps"] and early[3]["bytes_transferred"] < plain[3]["bytes_transferred"]

    def test_the_models_generation_config_is_put_back(self):
        model = llama(260)
        before = (model.generation_config.num_assistant_tokens, model.generation_config.num_assistant_tokens_schedule)
        traced_generation(model, Speculation(early_exit_layers=1, draft_tokens=7, schedule="heuristic"), max_new_tokens=4, residency="first")
        assert (model.generation_config.num_assistant_tokens, model.generation_config.num_assistant_tokens_schedule) == before

    def test_an_exit_past_the_resident_layers_or_the_model_is_refused_by_name(self):
        with pytest.raises(ConfigError, match="early_exit=2 .*at most 1"):
            check_early_exit(2, 4, resident=[0, 2])
        with pytest.raises(ConfigError, match="early_exit"):
            check_early_exit(4, 4)
        check_early_exit(2, 4, resident=[0, 1])

    def test_generating_with_an_exit_past_the_resident_layers_is_refused_before_any_forward(self):
        """Whoever offloaded the model: layers 0 and 2 resident (interleaved) cannot draft two layers deep."""
        model = llama(260)
        before = model.generation_config.num_assistant_tokens
        with offload(model, OffloadConfig(num_layers_on_gpu=2)):
            with pytest.raises(ConfigError, match="early_exit=2 .*at most 1"):
                generate_once(model, ByteTokenizer(), PROMPT, 4, raw=True, speculation=Speculation(early_exit_layers=2, draft_tokens=9))
        assert model.generation_config.num_assistant_tokens == before

    def test_run_puts_the_first_layers_resident_and_refuses_another_residency(self, in_tmp_dir):
        refused = subprocess.run([sys.executable, "-m", "tracedoffload", "run", "--early-exit", "2", "--residency", "last"], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "residency='last'" in refused.stderr and "--early-exit" in refused.stderr
        command = [sys.executable, "-m", "tracedoffload", "run", "--model", "random", "--num-gpu-layers", "3", "--early-exit", "4", "--no-progress"]
        too_far = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert too_far.returncode == 2 and "early_exit=4" in too_far.stderr and "at most 3" in too_far.stderr


class TestSettings:
    @pytest.mark.parametrize(
        "settings, field",
        [
            ({}, "speculation"),
            ({"prompt_lookup_tokens": 0}, "prompt_lookup_tokens"),
            ({"prompt_lookup_tokens": 2, "draft_tokens": 0}, "draft_tokens"),
            ({"prompt_lookup_tokens": 2, "schedule": "sometimes"}, "draft_schedule"),
        ],
    )
    def test_bad_settings_name_their_field(self, settings, field):
        with pytest.raises(ConfigError, match=field):
            Speculation(**settings)

    def test_run_drafts_with_prompt_lookup_and_reports_it(self, in_tmp_dir):
        command = [sys.executable, "-m", "tracedoffload", "run", "--model", "random", "--raw", "--prompt", PROMPT, "--max-new-tokens", "12", "--prompt-lookup", "4", "--json", "--no-progress"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        stats = json.loads(result.stdout)["stats"]
        assert stats["drafted_tokens"] > 0 and stats["acceptance_rate"] is not None

    def test_run_refuses_a_bad_prompt_lookup_by_name(self):
        result = subprocess.run([sys.executable, "-m", "tracedoffload", "run", "--prompt-lookup", "0"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "prompt_lookup" in result.stderr


@pytest.mark.parametrize(
    "speculation, residency",
    [(Speculation(prompt_lookup_tokens=6), "interleaved"), (Speculation(early_exit_layers=8, draft_tokens=4), "first")],
    ids=["prompt lookup", "early exit"],
)
def test_the_default_model_says_the_same_with_and_without_speculation(default_model, speculation, residency):
    model, tokenizer = default_model.model, default_model.tokenizer
    prompt = "Copy this line exactly: red green blue yellow red green blue yellow red green blue"
    offloader = offload(model, OffloadConfig(preset="balanced", residency=residency))
    try:
        plain_answer = generate_once(model, tokenizer, prompt, 24)
        speculated = generate_once(model, tokenizer, prompt, 24, speculation=speculation)
    finally:
        offloader.detach()
    assert speculated.text == plain_answer.text and speculated.finish_reason == plain_answer.finish_reason
