"""Telling a leak from expected growth.

Memory legitimately grows while sequences run: every token a live sequence holds in its KV cache
costs `kv_bytes_per_token`, and allocators grab memory in steps and then plateau. So the detector
judges the *excess* over what the live KV tokens account for (`kv_bytes_per_token` times the
tokens held, over every live sequence after the step, as whoever runs the model counts them: a
batch, a server's continuous batch, several threads), at quiet points (end of each step, every
offloaded layer released), and asks two questions of the last `window_steps` steps:

1. does the low point keep rising? (the window is cut into `segments`; each segment's minimum must
   exceed the previous one's: allocator steps and plateaus fail this, a leak passes it);
2. is the rise large and steady? (total rise >= `min_rise_bytes` and least-squares slope >=
   `min_bytes_per_step` per step).

Sequences finishing and starting, batches growing and shrinking, long and short prompts: all of it
moves the live KV tokens, so none of it moves the excess. A leak does.

Across idle points the same question is asked of the reading taken when a generation starts on an
idle model (no sequence live, no KV cache held): rising at every one of `generations_window`
idle points, by `min_rise_bytes_across_generations` in all, and not flattening (the second half
of the window rises per idle point at least 0.6 times as fast as the first), is a leak that
survives between requests. The first `warmup_generations` idle points are not judged: while
prompts reach new lengths, allocators and kernel caches set new high-water marks (seen here:
+73 MiB over the first 7 generations, flat after), a rise that flattens; a leak does not.
The first `warmup_steps` steps after an idle point are not judged (first-touch allocations).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

from tracedoffload._checks import check_int
from tracedoffload._exceptions import ConfigError

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class LeakPolicy:
    window_steps: int = 24
    segments: int = 4
    warmup_steps: int = 4
    min_rise_bytes: int = 8 * MiB
    min_bytes_per_step: int = 256 * 1024
    generations_window: int = 8
    warmup_generations: int = 8
    min_rise_bytes_across_generations: int = 64 * MiB

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_int(field.name, getattr(self, field.name), 0)
        if self.segments < 2 or self.window_steps < 2 * self.segments:
            raise ConfigError("window_steps", self.window_steps, f"at least 2 x segments ({2 * self.segments}), with segments >= 2")
        check_int("generations_window", self.generations_window, 3)


@dataclasses.dataclass(frozen=True)
class LeakAlert:
    """A suspected leak: where, how fast, and how it was seen."""

    source: str  # "host" or "device"
    bytes_per_step: float  # estimated leak rate (per idle point when scope is "generations")
    excess_bytes: int  # rise of the low point over the window, beyond expected growth
    step_index: int  # the step at which it was detected (-1 across generations)
    scope: str  # "steps" (while sequences run) or "generations" (idle point to idle point)


class LeakDetector:
    """Judges quiet-point readings of one memory source. Used from one thread (the telemetry one)."""

    def __init__(self, source: str, kv_bytes_per_token: int, policy: LeakPolicy | None = None, on_alert: Callable[[LeakAlert], None] | None = None) -> None:
        self.source = source
        self.kv_bytes_per_token = kv_bytes_per_token
        self.policy = policy or LeakPolicy()
        self._on_alert = on_alert
        self._window: collections.deque[tuple[int, int]] = collections.deque(maxlen=self.policy.window_steps)
        self._generation_starts: collections.deque[int] = collections.deque(maxlen=self.policy.generations_window)
        self._generations_seen = 0
        self._since_idle = 0
        self.suspected: LeakAlert | None = None

    def idle_point(self, idle_bytes: int | None) -> LeakAlert | None:
        """A generation starts on an idle model; `idle_bytes` is read before its prefill, with no
        KV cache held."""
        self._window.clear()
        self._since_idle = 0
        if self.suspected is not None and self.suspected.scope == "steps":
            self.suspected = None  # judged again on the steps from here
        if idle_bytes is None:
            return None
        self._generations_seen += 1
        if self._generations_seen <= self.policy.warmup_generations:
            return None
        self._generation_starts.append(idle_bytes)
        starts = list(self._generation_starts)
        if len(starts) < self.policy.generations_window:
            return None
        rising = all(b > a for a, b in zip(starts, starts[1:]))
        rise = starts[-1] - starts[0]
        middle = len(starts) // 2
        first_rate = (starts[middle] - starts[0]) / middle
        second_rate = (starts[-1] - starts[middle]) / (len(starts) - 1 - middle)
        steady = second_rate >= 0.6 * first_rate
        if rising and steady and rise >= self.policy.min_rise_bytes_across_generations:
            return self._raise(LeakAlert(self.source, rise / (len(starts) - 1), rise, -1, "generations"))
        if self.suspected is not None and self.suspected.scope == "generations" and not rising:
            self.suspected = None
        return None

    def observe(self, step_index: int, quiet_bytes: int | None, kv_tokens: int) -> LeakAlert | None:
        """Judge the quiet point after step `step_index`, when live sequences hold `kv_tokens`."""
        if quiet_bytes is None:
            return None
        self._since_idle += 1
        if self._since_idle <= self.policy.warmup_steps:
            return None
        excess = quiet_bytes - self.kv_bytes_per_token * kv_tokens
        self._window.append((step_index, excess))
        if len(self._window) < self.policy.window_steps:
            return None
        points = list(self._window)
        size = len(points) // self.policy.segments
        lows = [min(e for _, e in points[i * size : (i + 1) * size]) for i in range(self.policy.segments)]
        rising = all(b > a for a, b in zip(lows, lows[1:]))
        rise = lows[-1] - lows[0]
        slope = _slope(points)
        if rising and rise >= self.policy.min_rise_bytes and slope >= self.policy.min_bytes_per_step:
            if self.suspected is None:
                return self._raise(LeakAlert(self.source, slope, rise, step_index, "steps"))
            return None
        if self.suspected is not None and self.suspected.scope == "steps":
            self.suspected = None
        return None

    def _raise(self, alert: LeakAlert) -> LeakAlert:
        self.suspected = alert
        if self._on_alert is not None:
            self._on_alert(alert)
        return alert


def _slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of excess bytes over step index."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0
