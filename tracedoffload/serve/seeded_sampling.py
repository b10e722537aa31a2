"""Reproducible sampling per request in transformers' continuous batching.

The manager samples every sequence of a packed step with one `torch.multinomial` over one global
random stream, so what a request draws depends on who shared its steps: a `seed` could not make
it reproducible. This adds one per-request processor, last in the manager's chain (after the
temperature, top-k and top-p warpers), that samples a seeded request itself with the Gumbel-max
trick: the token is the argmax of its warped scores plus Gumbel noise drawn from a generator keyed
by (seed, index of the token in the answer). That is an exact draw from the warped distribution
(argmax(log p + G) ~ p), and depends on nothing but the request. The row then keeps only that
token, so the manager's own multinomial can pick nothing else. Unseeded rows pass untouched.

The noise is drawn on the host, so a seed draws the same noise on every device; each seeded row
costs one generator and one vocabulary-sized draw per step.

It also draws, at a random key, every row whose request asked for log-probabilities: the token it
draws is then known here, and its log-probability is recorded (`logprobs.py`).
"""

from __future__ import annotations

from typing import Any

import random

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from tracedoffload.serve.logprobs import LogprobLedger, record_logprobs

UNSEEDED = -1
_MASK64 = (1 << 64) - 1


def stream_key(seed: int, index: int) -> int:
    """A 31-bit generator key for token `index` of a request seeded with `seed` (splitmix64's
    finalizer over both: nearby seeds and indices give unrelated keys)."""
    z = ((seed & _MASK64) + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 33


def answer_index(state: Any) -> int:
    """How many tokens the request has produced: its next token's index in the answer. A request
    the manager evicted and re-queued carries its earlier tokens in its prompt; they count."""
    true_prompt = getattr(state, "_true_initial_tokens", 0)
    earlier = len(state.initial_tokens) - true_prompt if true_prompt else 0
    return earlier + len(state.generated_tokens)


def gumbel_choice(scores: torch.Tensor, key: int) -> int:
    """The token drawn from softmax(`scores`) by the noise keyed `key` (filtered tokens, at -inf,
    are never drawn)."""
    generator = torch.Generator().manual_seed(key)
    uniform = torch.rand(scores.size(-1), generator=generator, dtype=torch.float32).to(scores.device)
    gumbel = -torch.log(-torch.log(uniform))
    return int(torch.argmax(scores.float() + gumbel))


class SeededSampler(ContinuousBatchingLogitsProcessor):
    supported_kwargs: dict[str, type] = {"seed": int}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, ledger: LogprobLedger | None = None) -> None:
        self.ledger = ledger

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(UNSEEDED)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        keys = []
        for request in requests_with_new_token:
            seed = request.state.logit_processor_kwargs.get("seed")
            keys.append(UNSEEDED if seed is None else stream_key(seed, answer_index(request.state)))
        return torch.tensor(keys, dtype=torch.int32, device="cpu")

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        keys = tensor_arg[: scores.size(0)].tolist()
        wanted = self.ledger.raw if self.ledger is not None else {}
        drawn = [(row, key if key != UNSEEDED else random.getrandbits(31)) for row, key in enumerate(keys) if key != UNSEEDED or row in wanted]
        if not drawn:
            return scores
        scores = scores.clone()
        for row, key in drawn:
            choice = gumbel_choice(scores[row], key)  # a greedy row (top-k 1) has one candidate: its argmax
            scores[row].fill_(float("-inf"))
            scores[row, choice] = 0.0
            if row in wanted:
                record_logprobs(self.ledger, row, choice)
        return scores
