"""Speculative decoding over the offloaded model: how one generation drafts tokens for the model to
verify, through transformers' own assisted generation (`generate`).

With offloading, one forward streams every offloaded layer's weights whatever it processes: a
forward that verifies k drafted tokens moves the weights once for up to k + 1 new tokens. Two
kinds of draft:

- **prompt lookup** (`prompt_lookup_num_tokens`): the continuation of the latest n-gram's earlier
  match in the prompt and answer so far; no second model. It pays where the answer repeats the
  input (rewriting, extracting, code edits) and costs nothing where it finds no match.
- **a draft model**, small and kept resident on the device (never offloaded), sharing the
  model's vocabulary. transformers reads its settings from the draft's `generation_config`
  (passed to `generate`, they are ignored): `num_assistant_tokens` and the schedule, `constant`
  or `heuristic` (adaptive: one more drafted token after a step that kept them all, one fewer
  otherwise).

Greedy output with speculation equals greedy output without it (the model decides every token;
drafts only propose). transformers speculates at batch 1 only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tracedoffload._checks import check_int
from tracedoffload._exceptions import ConfigError

MAX_DRAFT_TOKENS = 64
SCHEDULES = ("constant", "heuristic")


@dataclasses.dataclass(frozen=True)
class Speculation:
    """How to draft: `prompt_lookup_tokens` (prompt lookup), or a `draft_model` proposing
    `draft_tokens` per step (adaptively with the `heuristic` schedule)."""

    prompt_lookup_tokens: int | None = None
    draft_model: Any = None
    draft_tokens: int = 5
    schedule: str = "constant"

    def __post_init__(self) -> None:
        if (self.prompt_lookup_tokens is None) == (self.draft_model is None):
            raise ConfigError("speculation", "both or neither", "prompt lookup or a draft model, one of them")
        if self.prompt_lookup_tokens is not None:
            check_int("prompt_lookup_tokens", self.prompt_lookup_tokens, 1, MAX_DRAFT_TOKENS)
        check_int("draft_tokens", self.draft_tokens, 1, MAX_DRAFT_TOKENS)
        if self.schedule not in SCHEDULES:
            raise ConfigError("draft_schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")

    @property
    def kind(self) -> str:
        return "prompt_lookup" if self.prompt_lookup_tokens is not None else "draft_model"

    def generate_kwargs(self, model: Any) -> dict[str, Any]:
        """What `generate` takes for it; checks a draft model against `model` first."""
        if self.prompt_lookup_tokens is not None:
            return {"prompt_lookup_num_tokens": self.prompt_lookup_tokens}
        check_draft(self.draft_model, model)
        config = self.draft_model.generation_config
        config.num_assistant_tokens = self.draft_tokens
        config.num_assistant_tokens_schedule = self.schedule
        return {"assistant_model": self.draft_model}


def check_draft(draft: Any, model: Any) -> None:
    """A draft must share the model's vocabulary (its tokens are the model's candidates)."""
    ours, theirs = _vocabulary(model), _vocabulary(draft)
    if ours != theirs:
        raise ConfigError("draft_model", f"a vocabulary of {theirs} tokens", f"a model with the same vocabulary as the model ({ours} tokens)")


def _vocabulary(model: Any) -> int:
    return int(model.get_input_embeddings().weight.shape[0])
