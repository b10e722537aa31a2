"""Which tokens get their layer spans exported: the in-process tail rule.

Every token is aggregated whatever this decides; it only chooses what leaves the process.
A token's layer detail is exported when it is one of the first tokens, slower than an absolute
threshold, slower than `relative_to_p95` times the running p95 of recent tokens, or the N-th of
the rest. Deciding after the token has ended (its duration is known) is what makes this a tail
rule: the slow tokens are the ones kept.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses

from tracedoffload._checks import check_choice, check_int, check_positive

LEVELS = ("off", "generation", "token", "layer")


@dataclasses.dataclass(frozen=True)
class SamplingPolicy:
    """What a tracing session exports.

    Args:
        level: "off" (no tracing), "generation" (generation spans), "token" (plus one trace per
            token), "layer" (plus the layer spans of the tokens the tail rule picks).
        first_tokens: the first N tokens of each generation always get layer detail.
        slow_token_ms: tokens slower than this always get layer detail (None: no absolute rule).
        relative_to_p95: tokens slower than this times the running p95 get layer detail (None: off).
        every_n: one in N of the remaining tokens gets layer detail (1 = every token: full detail).
        window: how many recent tokens the running p95 is computed over.
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
        """Every token's layer spans exported."""
        return cls(level="layer", every_n=1)


class TailSampler:
    """Applies a `SamplingPolicy` token by token. Used from the telemetry thread only."""

    def __init__(self, policy: SamplingPolicy) -> None:
        self.policy = policy
        self._recent: collections.deque[int] = collections.deque()
        self._sorted: list[int] = []
        self._since_sampled = 0

    def decide(self, token_index: int, duration_ns: int) -> str | None:
        """Why this token's layer detail is exported ("first", "slow", "relative", "every_n",
        "all"), or None when it is not."""
        policy = self.policy
        reason = None
        if policy.level != "layer":
            reason = None
        elif policy.every_n == 1:
            reason = "all"
        elif token_index < policy.first_tokens:
            reason = "first"
        elif policy.slow_token_ms is not None and duration_ns > policy.slow_token_ms * 1e6:
            reason = "slow"
        elif policy.relative_to_p95 is not None and len(self._sorted) >= 20 and duration_ns > policy.relative_to_p95 * self._p95():
            reason = "relative"
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
