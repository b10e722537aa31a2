"""The leak detector on synthetic quiet-point series: leaks flagged, normal growth never."""

from __future__ import annotations

import pytest

from tracedoffload import ConfigError
from tracedoffload.memory.leak import MiB, LeakDetector, LeakPolicy

KV = 64 * 1024  # expected KV-cache bytes per token
BASE = 500 * MiB


def feed(detector: LeakDetector, readings, kv_tokens=None) -> list:
    """One generation from an idle model: step t holds t KV tokens unless `kv_tokens` says."""
    detector.idle_point(BASE)
    alerts = []
    for step, value in enumerate(readings):
        alert = detector.observe(step, value, step if kv_tokens is None else kv_tokens[step])
        if alert is not None:
            alerts.append(alert)
    return alerts


def continuous_batch(steps: int, seed: int = 7):
    """A server's live KV tokens, step by step: sequences of random prompt and output lengths
    join (up to 16 at once) and leave; never idle."""
    import random

    rng = random.Random(seed)
    live: list[list[int]] = []  # [held, remaining]
    held = []
    for _ in range(steps):
        while len(live) < 16 and rng.random() < 0.5:
            live.append([rng.randint(8, 600), rng.randint(1, 300)])
        for sequence in live:
            sequence[0] += 1
            sequence[1] -= 1
        held.append(sum(s[0] for s in live))
        live = [s for s in live if s[1] > 0]
    return held


class TestWithinAGeneration:
    def test_kv_cache_growth_is_not_a_leak(self):
        """Memory growing by exactly the expected KV bytes per token, for 500 tokens, raises nothing."""
        detector = LeakDetector("device", KV)
        assert feed(detector, [BASE + KV * t for t in range(500)]) == []

    def test_allocator_steps_then_plateau_are_not_a_leak(self):
        """Reserved-style growth in a few big steps that then plateaus raises nothing."""
        detector = LeakDetector("device", KV)
        readings = [BASE + KV * t + (64 * MiB if t > 10 else 0) + (64 * MiB if t > 40 else 0) for t in range(200)]
        assert feed(detector, readings) == []

    def test_noise_around_kv_growth_is_not_a_leak(self):
        """Up and down noise of a few MiB around KV growth raises nothing."""
        detector = LeakDetector("host", KV)
        readings = [BASE + KV * t + ((t * 7919) % 5) * MiB for t in range(300)]
        assert feed(detector, readings) == []

    def test_a_steady_leak_is_flagged_within_32_steps(self):
        """1 MiB per step on top of KV growth is flagged by step 31 with a rate near 1 MiB."""
        detector = LeakDetector("host", KV)
        alerts = feed(detector, [BASE + KV * t + MiB * t for t in range(64)])
        assert len(alerts) == 1
        assert alerts[0].step_index < 32
        assert alerts[0].bytes_per_step == pytest.approx(MiB, rel=0.01)
        assert alerts[0].scope == "steps" and detector.suspected is alerts[0]

    def test_a_leak_below_the_rate_floor_is_not_flagged(self):
        """A rise slower than min_bytes_per_step (here 64 KiB/step) stays below the alert."""
        detector = LeakDetector("host", KV)
        assert feed(detector, [BASE + KV * t + 64 * 1024 * t for t in range(200)]) == []

    def test_absent_readings_never_alert(self):
        """A source that cannot be read (None) is never judged."""
        detector = LeakDetector("device", KV)
        assert feed(detector, [None] * 100) == []

    def test_suspicion_is_judged_again_after_an_idle_point(self):
        """A generation starting on an idle model clears a suspicion until its own steps show one."""
        detector = LeakDetector("host", KV)
        feed(detector, [BASE + MiB * t for t in range(40)])
        assert detector.suspected is not None
        detector.idle_point(BASE)
        assert detector.suspected is None

    def test_callback_receives_each_new_alert(self):
        """on_alert is called once per new suspicion, not once per step."""
        seen = []
        detector = LeakDetector("host", KV, on_alert=seen.append)
        feed(detector, [BASE + MiB * t for t in range(80)])
        assert len(seen) == 1


class TestWhileSequencesComeAndGo:
    """A server never idles: sequences join and leave every few steps, the KV cache swings by
    thousands of tokens, and only the live KV tokens say what is expected."""

    def test_a_continuous_batch_is_not_a_leak(self):
        """3000 steps of up to 16 sequences of random lengths, memory following their KV exactly
        (plus allocator noise of a few MiB), raise nothing."""
        detector = LeakDetector("device", KV)
        held = continuous_batch(3000)
        assert max(held[100:]) - min(held[100:]) > 2000  # the KV cache swings by over 125 MiB
        readings = [BASE + KV * h + ((t * 7919) % 5) * MiB for t, h in enumerate(held)]
        assert feed(detector, readings, held) == []

    def test_a_leak_under_a_continuous_batch_is_flagged_within_32_steps(self):
        """The same batch with 1 MiB leaked per step from step 1000 is flagged within 32 steps."""
        detector = LeakDetector("device", KV)
        held = continuous_batch(1200)
        readings = [BASE + KV * h + (MiB * (t - 1000) if t >= 1000 else 0) for t, h in enumerate(held)]
        alerts = feed(detector, readings, held)
        assert len(alerts) == 1 and 1000 <= alerts[0].step_index < 1032

    def test_judging_the_tokens_instead_of_the_live_kv_would_alert(self):
        """Control: the same continuous batch judged as if KV grew with a step counter (the old
        rule) is taken for a leak, or missed, as its KV swings: the live count is what works."""
        detector = LeakDetector("device", KV)
        held = continuous_batch(3000)
        readings = [BASE + KV * h for h in held]
        assert feed(detector, readings, [0] * len(held)) != []


class TestAcrossGenerations:
    def test_kv_sawtooth_between_generations_is_not_a_leak(self):
        """Idle memory back at the same level before every generation raises nothing."""
        detector = LeakDetector("host", KV)
        for _ in range(100):
            assert detector.idle_point(BASE + (MiB if _ % 2 else 0)) is None

    def test_idle_memory_rising_every_generation_is_flagged_after_warm_up(self):
        """Idle memory 16 MiB higher before every generation is flagged once warm-up and a window have passed."""
        detector = LeakDetector("host", KV)
        alerts = [detector.idle_point(BASE + 16 * MiB * g) for g in range(16)]
        assert alerts[:15] == [None] * 15
        assert alerts[-1] is not None and alerts[-1].scope == "generations"
        assert alerts[-1].bytes_per_step == pytest.approx(16 * MiB)

    def test_high_water_marks_that_flatten_are_not_a_leak(self):
        """Idle memory rising fast then flattening (new prompt lengths warming caches) raises nothing."""
        detector = LeakDetector("host", KV)
        # 1200 MiB approached by 20% less each generation: every step rises, by far more than the
        # size threshold, but the rise flattens.
        readings = [BASE + int(1200 * MiB * (1 - 0.8**g)) for g in range(40)]
        assert [detector.idle_point(r) for r in readings] == [None] * 40


class TestPolicy:
    @pytest.mark.parametrize(
        "field, value",
        [("window_steps", 4), ("segments", 1), ("warmup_steps", -1), ("min_rise_bytes", 1.5), ("generations_window", 2), ("min_bytes_per_step", True)],
    )
    def test_invalid_thresholds_name_the_field(self, field, value):
        """Each invalid threshold raises a ConfigError naming it."""
        with pytest.raises(ConfigError, match=field):
            LeakPolicy(**{field: value})
