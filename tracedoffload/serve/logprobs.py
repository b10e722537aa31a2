"""Log-probabilities per request in transformers' continuous batching: the model's own, before
any sampling setting.

The manager can return log-probabilities, but for the whole batch and after the warpers: under
this engine's greedy-as-top-k-1 (and a seeded draw's one-hot row) every token would read 0. So
two per-request processors share a `LogprobLedger` within each step:

- `RawLogprobs`, first in the chain, keeps the log-softmax of the raw logits of each row whose
  request asked for log-probabilities (`logprobs`: how many alternatives, 0 for none);
- the seeded sampler, last in the chain, draws those rows itself (a greedy row's only candidate
  is its argmax; a sampled one is drawn by the Gumbel-max trick, keyed by the request's seed or
  at random) and records the drawn token's log-probability and the best alternatives.

The engine reads a request's entries after the manager delivers its tokens (recorded before, on
the manager's thread), and forgets them when the request ends.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

NO_LOGPROBS = -1
MAX_TOP_LOGPROBS = 20


class TokenLogprob(NamedTuple):
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens and theirs, best first


class LogprobLedger:
    """Per step: the raw log-softmax of the rows that want it; per request: what was recorded."""

    def __init__(self) -> None:
        self.step_requests: list[tuple[str, int]] = []  # (request id, alternatives) per row with a new token
        self.raw: dict[int, torch.Tensor] = {}  # row -> log-softmax of its raw logits, this step only
        self._entries: dict[str, list[TokenLogprob]] = {}
        self._lock = threading.Lock()

    def record(self, request_id: str, entry: TokenLogprob) -> None:
        with self._lock:
            self._entries.setdefault(request_id, []).append(entry)

    def take(self, request_id: str, count: int) -> list[TokenLogprob]:
        """The first `count` tokens' entries of a request (fewer if some were never recorded)."""
        with self._lock:
            return list(self._entries.get(request_id, ())[:count])

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._entries.pop(request_id, None)


class RawLogprobs(ContinuousBatchingLogitsProcessor):
    supported_kwargs: dict[str, type] = {"logprobs": int}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, ledger: LogprobLedger) -> None:
        self.ledger = ledger

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(NO_LOGPROBS)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        rows = [(r.state.request_id, int(r.state.logit_processor_kwargs.get("logprobs", NO_LOGPROBS))) for r in requests_with_new_token]
        self.ledger.step_requests = rows
        return torch.tensor([top for _, top in rows], dtype=torch.int32, device="cpu")

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        tops = tensor_arg[: scores.size(0)].tolist()
        self.ledger.raw = {row: torch.log_softmax(scores[row].float(), dim=-1) for row, top in enumerate(tops) if top != NO_LOGPROBS}
        return scores


def record_logprobs(ledger: LogprobLedger, row: int, choice: int) -> None:
    """Record row `row`'s drawn token (`choice`) against its request, from the raw log-softmax."""
    raw = ledger.raw.get(row)
    if raw is None or row >= len(ledger.step_requests):
        return
    request_id, top = ledger.step_requests[row]
    alternatives: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, indices = torch.topk(raw, min(top, raw.numel()))
        alternatives = tuple(zip(indices.tolist(), values.tolist()))
    ledger.record(request_id, TokenLogprob(choice, float(raw[choice]), alternatives))
