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

- **early exit** (`assistant_early_exit`): the model itself drafts, running only its first k
  decoder layers and its head. Worth it only where those layers are resident: a draft through
  offloaded layers would stream their weights once more per drafted token. So an early exit past
  the offloader's resident first layers is refused (`check_early_exit`, when it is applied to an
  offloaded model), and the draft forwards are traced as draft forwards, not steps. It pays on models trained to exit early (LayerSkip); on others the early
  layers' guesses are mostly refused.

Greedy output with speculation equals greedy output without it (the model decides every token;
drafts only propose). transformers speculates at batch 1 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from tracedoffload._checks import check_int
from tracedoffload._exceptions import ConfigError

MAX_DRAFT_TOKENS = 64
SCHEDULES = ("constant", "heuristic")


@dataclasses.dataclass(frozen=True)
class Speculation:
    """How to draft, one of: `prompt_lookup_tokens` (prompt lookup); a `draft_model`; or
    `early_exit_layers` (the model's own first layers). The last two propose `draft_tokens` per
    step (adaptively with the `heuristic` schedule)."""

    prompt_lookup_tokens: int | None = None
    draft_model: Any = None
    early_exit_layers: int | None = None
    draft_tokens: int = 5
    schedule: str = "constant"

    def __post_init__(self) -> None:
        chosen = [self.prompt_lookup_tokens is not None, self.draft_model is not None, self.early_exit_layers is not None]
        if sum(chosen) != 1:
            raise ConfigError("speculation", f"{sum(chosen)} kinds", "one of prompt lookup, a draft model or early exit")
        if self.prompt_lookup_tokens is not None:
            check_int("prompt_lookup_tokens", self.prompt_lookup_tokens, 1, MAX_DRAFT_TOKENS)
        if self.early_exit_layers is not None:
            check_int("early_exit", self.early_exit_layers, 1)
        check_int("draft_tokens", self.draft_tokens, 1, MAX_DRAFT_TOKENS)
        if self.schedule not in SCHEDULES:
            raise ConfigError("draft_schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")

    @property
    def kind(self) -> str:
        if self.prompt_lookup_tokens is not None:
            return "prompt_lookup"
        return "draft_model" if self.draft_model is not None else "early_exit"

    @contextlib.contextmanager
    def applied(self, model: Any) -> Iterator[dict[str, Any]]:
        """What `generate` takes for it, for the block. transformers reads the number of drafted
        tokens and the schedule from the drafting model's `generation_config` (it ignores them as
        `generate`'s arguments): they are set there for the block and put back after, so the
        model is left as it was. Checks a draft model or an early exit against `model` first."""
        if self.prompt_lookup_tokens is not None:
            yield {"prompt_lookup_num_tokens": self.prompt_lookup_tokens}
            return
        if self.draft_model is not None:
            check_draft(self.draft_model, model)
            drafting, kwargs = self.draft_model, {"assistant_model": self.draft_model}
        else:
            check_early_exit(self.early_exit_layers, _decoder_layer_count(model), _resident_layers(model))
            drafting, kwargs = model, {"assistant_early_exit": self.early_exit_layers}
        config = drafting.generation_config
        before = (config.num_assistant_tokens, config.num_assistant_tokens_schedule)
        config.num_assistant_tokens, config.num_assistant_tokens_schedule = self.draft_tokens, self.schedule
        try:
            yield kwargs
        finally:
            config.num_assistant_tokens, config.num_assistant_tokens_schedule = before


def check_draft(draft: Any, model: Any) -> None:
    """A draft must share the model's vocabulary (its tokens are the model's candidates)."""
    ours, theirs = _vocabulary(model), _vocabulary(draft)
    if ours != theirs:
        raise ConfigError("draft_model", f"a vocabulary of {theirs} tokens", f"a model with the same vocabulary as the model ({ours} tokens)")


def check_early_exit(layers: int, num_layers: int, resident: Sequence[int] | None = None) -> None:
    """An early exit drafts with layers 0..layers-1: fewer than the model has, and all resident
    when some layers are offloaded (`resident`: the offloader's resident layer indices)."""
    check_int("early_exit", layers, 1, num_layers - 1)
    if resident is None:
        return
    kept = set(resident)
    prefix = next((n for n in range(num_layers) if n not in kept), num_layers)
    if layers > prefix:
        raise ConfigError(
            "early_exit",
            layers,
            f"at most {prefix}, the layers resident from the first (the draft would stream offloaded layers once more per "
            f"drafted token): keep more layers resident with --num-gpu-layers, or exit earlier",
        )


def _resident_layers(model: Any) -> Sequence[int] | None:
    """The resident layer indices of the offloader attached to `model`; None when none is (every
    layer is where the model put it)."""
    from tracedoffload.offloader import HOOK_ATTR

    offloader = getattr(model, HOOK_ATTR, None)
    return offloader.resident_indices if offloader is not None else None


def _decoder_layer_count(model: Any) -> int:
    from tracedoffload.layers import find_decoder_layers

    return len(find_decoder_layers(model)[1])


def _vocabulary(model: Any) -> int:
    return int(model.get_input_embeddings().weight.shape[0])
