"""One forward serves many sequences: a batched `generate` and transformers' continuous batching,
offloaded and traced. Each step names the sequences it served and links to their generations;
each generation reaches its steps; outputs equal per-prompt greedy generation."""

from __future__ import annotations

import collections

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM

from tracedoffload import OffloadConfig, names, offload
from tracedoffload.continuous_batching import trace_continuous_batching
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.exporters.otlp_json import encode_otlp_json
from tracedoffload.tracing.session import TracingSession
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from .otlp_protobuf import parse_as_protobuf

NEW_TOKENS = 8
PROMPT_LENGTHS = (5, 12, 3, 20, 9)


def llama(vocab_size: int = 256) -> LlamaForCausalLM:
    """A tiny random Llama (seeded: the same weights at every call)."""
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
        intermediate_size=128, max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, 256, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def greedy(prompts) -> list[list[int]]:
    """Each prompt alone, greedy, on the resident model: what every batched run must equal."""
    model = llama()
    with torch.inference_mode():
        return [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p):].tolist() for p in prompts]


def sizing(max_batch_tokens: int = 64) -> ContinuousBatchingConfig:
    """The paged KV cache sized explicitly (never from free memory), CUDA graphs and async off."""
    return ContinuousBatchingConfig(
        page_size=16, num_blocks=32, max_batch_tokens=max_batch_tokens, max_requests_per_batch=8,
        use_cuda_graph=False, use_async_batching=False, auto_switch_to_flash=False, allow_block_sharing=False,
    )


def traced(run, exporter):
    """`run(model, session)` on an offloaded model traced at full detail; returns its result, the
    spans split into steps and generations, and the statistics."""
    model = llama()
    offloader = offload(model, OffloadConfig(num_layers_on_gpu=2))
    session = TracingSession([exporter], policy=SamplingPolicy.full_detail())
    session.attach(offloader)
    try:
        result = run(model, session)
    finally:
        session.shutdown(10)
        offloader.detach()
    spans = exporter.get_finished_spans()
    # Events sharing one attributes dict, links to shared generation contexts: encoded by
    # identity (otlp_json._shared), they must still read as the SDK's own encoder writes them.
    assert parse_as_protobuf(encode_otlp_json(spans)) == encode_spans(spans)
    steps = sorted((s for s in spans if s.name == names.SPAN_STEP), key=lambda s: s.attributes[names.STEP_INDEX])
    generations = {s.attributes[names.GENERATION_ID]: s for s in spans if s.name.startswith(names.GEN_AI_OPERATION)}
    return result, steps, generations, session.snapshot()


def served(step) -> list[str]:
    """The generation ids a step served, one per sequence."""
    return list(step.attributes.get(names.STEP_SEQUENCE_GENERATION_IDS) or [step.attributes[names.GENERATION_ID]])


def assert_both_ways(steps, generations) -> None:
    """Each step links to every generation it served; each generation's step events name exactly
    the steps that served it."""
    by_generation = collections.defaultdict(list)
    for step in steps:
        ids = served(step)
        assert step.attributes[names.STEP_GENERATIONS] == len(set(ids))
        assert {link.context.span_id for link in step.links} == {generations[g].context.span_id for g in ids}
        for generation_id in ids:
            by_generation[generation_id].append(f"{step.context.trace_id:032x}")
    for generation_id, span in generations.items():
        events = [e.attributes[names.EVENT_STEP_TRACE_ID] for e in span.events if e.name == names.EVENT_STEP]
        assert events == by_generation[generation_id]
        assert span.attributes[names.GENERATION_STEPS] == len(events)


class TestBatchedGenerate:
    def test_each_sequence_is_its_own_generation(self, prompts, greedy, memory_exporter):
        """A left-padded batch of 5 through one `generate`: every forward serves all 5 sequences
        (prefill at their own prompt lengths, then decode), each has its span, its length and its
        finish reason, and the outputs equal per-prompt greedy generation."""
        lengths = [len(p) for p in prompts]

        def run(model, session):
            width = max(lengths)
            input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, prompt in enumerate(prompts):
                input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
                mask[row, width - len(prompt) :] = 1
            with torch.inference_mode(), session.generations("llama", lengths, NEW_TOKENS) as handles:
                out = model.generate(input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
                for row, handle in enumerate(handles):
                    handle.output_tokens = NEW_TOKENS
                    handle.finish_reason = "length" if row % 2 else "stop"  # what the caller decided, per sequence
            return out[:, width:].tolist(), [h.generation_id for h in handles]

        (outputs, ids), steps, generations, stats = traced(run, memory_exporter)
        assert outputs == greedy
        assert len(steps) == NEW_TOKENS and stats["steps"] == NEW_TOKENS
        first = steps[0].attributes
        assert first[names.STEP_PHASE] == "prefill" and first[names.STEP_SEQUENCES] == 5
        assert list(first[names.STEP_SEQUENCE_TOKENS]) == lengths and list(first[names.STEP_SEQUENCE_POSITIONS]) == [0] * 5
        for n, step in enumerate(steps[1:], start=1):
            assert step.attributes[names.STEP_PHASE] == "decode"
            assert list(step.attributes[names.STEP_SEQUENCE_POSITIONS]) == [length + n - 1 for length in lengths]
            assert step.attributes[names.STEP_KV_TOKENS] == sum(lengths) + 5 * n
        assert stats["generated_tokens"] == 5 * NEW_TOKENS and stats["generations"] == 5
        assert stats["per_generated_token"]["steps"] == pytest.approx(1 / 5)
        assert [generations[g].attributes[names.GEN_AI_USAGE_INPUT_TOKENS] for g in ids] == lengths
        assert [generations[g].attributes[names.GEN_AI_RESPONSE_FINISH_REASONS] for g in ids] == [("stop",), ("length",)] * 2 + [("stop",)]
        assert_both_ways(steps, generations)


class TestContinuousBatching:
    def test_generate_batch_offloaded_and_traced(self, prompts, greedy, memory_exporter):
        """`generate_batch` under the offload hooks: outputs equal per-prompt greedy; every
        forward is a step of the requests it served; 5 generations of 8 tokens each."""

        def run(model, session):
            with torch.inference_mode(), trace_continuous_batching(model, session, "llama"):
                results = model.generate_batch(inputs=prompts, generation_config=GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False), continuous_batching_config=sizing())
            return [results[f"req_{i}"].generated_tokens for i in range(len(prompts))]

        outputs, steps, generations, stats = traced(run, memory_exporter)
        assert outputs == greedy
        assert len(generations) == 5 and stats["generations"] == 5
        for span in generations.values():
            assert span.attributes[names.GEN_AI_USAGE_OUTPUT_TOKENS] == NEW_TOKENS
            assert span.attributes[names.GEN_AI_RESPONSE_FINISH_REASONS] == ("length",)
            assert span.attributes[names.GENERATION_TTFT_NS] > 0
        assert sum(s.attributes[names.STEP_GENERATED_TOKENS] for s in steps) == 5 * NEW_TOKENS == stats["generated_tokens"]
        assert steps[0].attributes[names.STEP_SEQUENCES] == 5 and steps[0].attributes[names.STEP_PHASE] == "prefill"
        assert sorted(generations[g].attributes[names.GEN_AI_USAGE_INPUT_TOKENS] for g in served(steps[0])) == sorted(PROMPT_LENGTHS)
        assert_both_ways(steps, generations)

    def test_long_prompts_are_prefilled_in_chunks_beside_decodes(self, prompts, greedy, memory_exporter):
        """With 8 tokens per forward, prompts are split: a step carries one request's prefill chunk
        beside another's decode (phase mixed), chunks generate nothing, outputs are unchanged."""
        chosen = [prompts[0], prompts[1], prompts[3]]

        def run(model, session):
            with torch.inference_mode(), trace_continuous_batching(model, session, "llama"):
                results = model.generate_batch(inputs=chosen, generation_config=GenerationConfig(max_new_tokens=3, do_sample=False), continuous_batching_config=sizing(max_batch_tokens=8))
            return [results[f"req_{i}"].generated_tokens for i in range(len(chosen))]

        outputs, steps, generations, stats = traced(run, memory_exporter)
        assert outputs == [greedy[i][:3] for i in (0, 1, 3)]
        phases = collections.Counter(p for s in steps for p in s.attributes.get(names.STEP_SEQUENCE_PHASES, [s.attributes[names.STEP_PHASE]]))
        assert phases["prefill_chunk"] >= 2 and phases["decode"] >= 3
        assert any(s.attributes[names.STEP_PHASE] == "mixed" for s in steps)
        assert all(s.attributes[names.STEP_TOKENS] <= 8 for s in steps)
        # Every prompt token is processed exactly once, and each request generates its 3 tokens.
        assert stats["processed_tokens"] == sum(len(p) for p in chosen) + 3 * (3 - 1)
        assert stats["generated_tokens"] == 9
        assert_both_ways(steps, generations)
