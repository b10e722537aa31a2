"""Per-request penalties and `min_p` in transformers' continuous batching, which applies only
temperature, top-k and top-p per request.

- `RequestPenalties`, right after the raw log-probabilities (before any warper, as `generate`
  orders them): `repetition_penalty` (transformers' rule over the prompt and the answer so far:
  a seen token's logit divided by it when positive, multiplied when negative), and OpenAI's
  `presence_penalty` and `frequency_penalty` over the answer so far (minus the penalty for each
  token that appeared, minus the penalty times its count).
- `RequestMinP`, after top-p and before the seeded sampler: drops tokens whose probability is
  below `min_p` times the most likely one's (at least one kept).

A processor's argument is one int32 per row, too small for a request's tokens and three floats:
the settings and each row's token counts are read from the request states when the step is
prepared (`prepare_tensor_args`, the manager's thread, just before the forward) and kept for
that step's `__call__`. A step in which no request set any of them costs one list walk.
"""

from __future__ import annotations

import collections
from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

PENALTY_KWARGS = ("repetition_penalty", "presence_penalty", "frequency_penalty")


class RequestPenalties(ContinuousBatchingLogitsProcessor):
    supported_kwargs: dict[str, type] = {name: float for name in PENALTY_KWARGS}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._rows: dict[int, tuple[float, float, float, list[int], collections.Counter[int]]] = {}

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        rows = {}
        for row, request in enumerate(requests_with_new_token):
            kwargs = request.state.logit_processor_kwargs
            repetition, presence, frequency = (float(kwargs.get(name, neutral)) for name, neutral in zip(PENALTY_KWARGS, (1.0, 0.0, 0.0)))
            if (repetition, presence, frequency) != (1.0, 0.0, 0.0):
                state = request.state
                answer = collections.Counter(state.generated_tokens)
                rows[row] = (repetition, presence, frequency, [*state.initial_tokens, *state.generated_tokens], answer)
        self._rows = rows
        return torch.zeros(len(requests_with_new_token), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return scores
        scores = scores.clone()
        for row, (repetition, presence, frequency, seen, answer) in self._rows.items():
            if row >= scores.size(0):
                continue
            if repetition != 1.0 and seen:
                ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=scores.device)
                picked = scores[row, ids]
                scores[row, ids] = torch.where(picked < 0, picked * repetition, picked / repetition)
            if answer and (presence or frequency):
                ids = torch.tensor(list(answer), dtype=torch.long, device=scores.device)
                counts = torch.tensor(list(answer.values()), dtype=scores.dtype, device=scores.device)
                scores[row, ids] -= presence + frequency * counts
        return scores


class RequestMinP(ContinuousBatchingLogitsProcessor):
    supported_kwargs: dict[str, type] = {"min_p": float}
    ignored_kwargs: tuple[str, ...] = ()

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.copy_(torch.zeros_like(int32_tensor, dtype=torch.float32).view(dtype=torch.int32))

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        values = [float(r.state.logit_processor_kwargs.get("min_p", 0.0)) for r in requests_with_new_token]
        return torch.tensor(values, dtype=torch.float32).view(dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        min_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
        if not bool((min_p > 0).any()):
            return scores
        probs = torch.softmax(scores.float(), dim=-1)
        threshold = min_p.unsqueeze(-1) * probs.max(dim=-1, keepdim=True).values
        return scores.masked_fill(probs < threshold, float("-inf"))
