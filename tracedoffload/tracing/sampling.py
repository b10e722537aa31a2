"""Which steps get their layer spans exported: the in-process tail rule.

Every step is aggregated whatever this decides; it only chooses what leaves the process.
A step's layer detail is exported when it is one of the first steps (see `first_tokens`),
slower than an absolute threshold, slower than `relative_to_p95` times the running p95 of recent
steps, or the N-th of the rest. Deciding after the step has ended (its duration is known) is what
makes this a tail rule: the slow steps are the ones kept.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses

from tracedoffload import names
from tracedoffload._checks import check_choice, check_int, check_positive

LEVELS = ("off", "generation", "token", "layer")


@dataclasses.dataclass(frozen=True)
class SamplingPolicy:
    """What a tracing session exports.

    Args:
        level: "off" (no tracing), "generation" (generation spans), "token" (plus one trace per
            step, i.e. per token of a batch-1 run), "layer" (plus the layer spans of the steps
            the tail rule picks).
        first_tokens: a step of one sequence among the first N steps of its generation always
            gets layer detail; a step of several sequences, only among the session's first N
            steps (in a continuous batch nearly every step holds some request's first steps).
        slow_token_ms: steps slower than this always get layer detail (None: no absolute rule).
        relative_to_p95: steps slower than this times the running p95 get layer detail (None: off).
        every_n: one in N of the remaining steps gets layer detail (1 = every step: full detail).
        window: how many recent steps the running p95 is computed over.
    """

    level: str = "layer"
    first_tokens: int = 4
    slow_token_ms: float | None = None
    relative_to_p95: float | None = 1.5
    every_n: int = 64
    window: int = 256

    def __post_init__(self) -> None:
        check_choice("trace_level", self.level, LEVELS)
        check_int("first_tokens", self.first_tokens, 0)
        if self.slow_token_ms is not None:
            check_positive("slow_token_ms", self.slow_token_ms, "a number of milliseconds > 0, or None")
        if self.relative_to_p95 is not None:
            check_positive("relative_to_p95", self.relative_to_p95, "a factor > 0 (e.g. 1.5), or None")
        check_int("every_n", self.every_n, 1, meaning="1 exports every token's layers")
        check_int("window", self.window, 8)

    @classmethod
    def full_detail(cls) -> SamplingPolicy:
        """Every step's layer spans exported."""
        return cls(level="layer", every_n=1)


class TailSampler:
    """Applies a `SamplingPolicy` step by step. Used from the telemetry thread only."""

    def __init__(self, policy: SamplingPolicy) -> None:
        self.policy = policy
        self._recent: collections.deque[int] = collections.deque()
        self._sorted: list[int] = []
        self._since_sampled = 0

    def decide(self, first: bool, duration_ns: int) -> str | None:
        """Why this step's layer detail is exported ("first", "slow", "relative", "every_n",
        "all"), or None when it is not. `first`: it is among the first `first_tokens` steps of a
        generation it serves."""
        policy = self.policy
        reason = None
        if policy.level != "layer":
            reason = None
        elif policy.every_n == 1:
            reason = "all"
        elif first:
            reason = "first"
        elif policy.slow_token_ms is not None and duration_ns > policy.slow_token_ms * 1e6:
            reason = names.SAMPLED_BY_SLOW
        elif policy.relative_to_p95 is not None and len(self._sorted) >= 20 and duration_ns > policy.relative_to_p95 * self._p95():
            reason = names.SAMPLED_BY_RELATIVE
        else:
            self._since_sampled += 1
            if self._since_sampled >= policy.every_n:
                reason = "every_n"
        if reason is not None:
            self._since_sampled = 0
        self._observe(duration_ns)
        return reason

    def _p95(self) -> int:
        return self._sorted[min(len(self._sorted) - 1, int(0.95 * len(self._sorted)))]

    def _observe(self, duration_ns: int) -> None:
        self._recent.append(duration_ns)
        bisect.insort(self._sorted, duration_ns)
        if len(self._recent) > self.policy.window:
            old = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
