"""A tiny offloaded Qwen2 model traced into memory, shared by the tracing tests."""

from __future__ import annotations

import pytest
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from transformers import Qwen2Config, Qwen2ForCausalLM

from tracedoffload import OffloadConfig, offload
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import TracingSession

NUM_LAYERS = 6
PROMPT_TOKENS = 5


def tiny_model() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def traced_generation(session: TracingSession, num_layers_on_gpu: int = 3, new_tokens: int = 6, generations: int = 1, flush: bool = True):
    """Run `generations` greedy generations of the tiny model under `session`; returns the offloader."""
    model = tiny_model()
    offloader = offload(model, OffloadConfig(num_layers_on_gpu=num_layers_on_gpu))
    session.attach(offloader)
    prompt = torch.arange(PROMPT_TOKENS).unsqueeze(0)
    for _ in range(generations):
        with torch.inference_mode(), session.generation("tiny", input_tokens=PROMPT_TOKENS, max_new_tokens=new_tokens) as handle:
            out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            handle.output_tokens = out.shape[1] - PROMPT_TOKENS
    if flush:
        session.flush(10)
    return offloader


@pytest.fixture
def memory_exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def full_detail_run(memory_exporter):
    """A finished 6-token generation, every span exported to memory."""
    session = TracingSession([memory_exporter], policy=SamplingPolicy.full_detail())
    offloader = traced_generation(session)
    session.shutdown(10)
    offloader.detach()
    return session, memory_exporter.get_finished_spans(), offloader
