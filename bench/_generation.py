"""What the tracing benchmarks time: one greedy generation, traced by `session` when there is one."""

from __future__ import annotations

import torch

from tracedoffload.tracing.session import TracingSession


def generate(model: torch.nn.Module, prompt: torch.Tensor, tokens: int, session: TracingSession | None) -> None:
    """Exactly `tokens` new tokens (no early stop), inside a generation span when traced."""
    with torch.inference_mode():
        if session is None:
            model.generate(prompt, max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            return
        with session.generation("default", prompt.shape[1], tokens) as handle:
            model.generate(prompt, max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            handle.output_tokens = tokens
