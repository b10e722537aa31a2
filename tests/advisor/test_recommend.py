"""The recommendation on the hand-built run (conftest.py), worked out by hand.

With k of its 4 layers resident on the CPU: ms per token = 0.6 (other 0.4, gap 0.2) + k x 1.0
(resident compute) + (4 - k) x (0.8 compute + 1 copy + 0.1 swaps) = 8.2 - 0.9 k; peak memory =
10 MB base + k MB resident + one MB per slot (min(prefetch + 1, 4 - k)) + 102,500 (KV and
activations). 31 candidates: 12 at k = 0 (4 slot counts x 3 residencies), 9 at 1, 6 at 2, 3 at
3, 1 at 4.
"""

from __future__ import annotations

import pytest

from tracedoffload.advisor.recommend import advise

from .conftest import hand_run

REST = 102_500


class TestRecommendation:
    def test_without_a_budget_the_fastest_in_the_runs_own_memory(self):
        """The run (2 resident, 2 slots) needs 14,102,500 bytes; every layer resident needs the same
        and takes 4.6 ms instead of 6.4."""
        advice = advise(hand_run())
        assert len(advice.candidates) == 31 and advice.excluded == 0
        assert advice.measured.peak_bytes == 14_000_000 + REST
        assert advice.recommended.choice.gpu_layers == 4
        assert advice.recommended.ms_per_token == pytest.approx(4.6)
        assert "needs no more device memory than the run's own configuration" in advice.reason

    def test_device_memory_takes_the_fastest_that_fits(self):
        """12,200,000 bytes: 1 resident with one slot (12,102,500, 7.3 ms) fits, 2 resident do not
        (13,102,500 with one slot, 6.4 ms); fitting: 0 resident with 1 or 2 slots and 1 resident with
        1, three residencies each: 9 of 31."""
        advice = advise(hand_run(), device_memory=12_200_000)
        assert advice.excluded == 22
        assert (advice.recommended.choice.gpu_layers, advice.recommended.choice.prefetch) == (1, 0)
        assert advice.recommended.ms_per_token == pytest.approx(7.3)
        assert "faster needs more: 2 of 4 resident (interleaved, prefetch 0) would take 6.4 ms/token in 12.5 MiB" in advice.reason

    def test_nothing_fits(self):
        advice = advise(hand_run(), device_memory=1_000_000)
        assert advice.recommended is None
        assert advice.reason.startswith("none of the 31 candidates fits 976.6 KiB: the smallest, 0 of 4 resident")

    def test_a_target_takes_the_least_memory_that_meets_it(self):
        """7 ms: 2 resident (6.4 ms) meet it, 1 (7.3 ms) does not; the least memory that meets it is
        2 resident with one slot, 13,102,500 bytes."""
        advice = advise(hand_run(), target_ms=7.0)
        assert advice.meets_target is True
        assert (advice.recommended.choice.gpu_layers, advice.recommended.choice.prefetch) == (2, 0)
        assert advice.recommended.peak_bytes == 13_000_000 + REST
        assert advice.reason == "the least device memory that meets 7 ms/token; one resident layer fewer would take 7.3 ms/token"

    def test_a_target_nothing_meets_names_the_closest(self):
        """1 ms: the fastest is every layer resident, 4.6 ms, 360 % over."""
        advice = advise(hand_run(), target_ms=1.0)
        assert advice.meets_target is False
        assert advice.recommended.ms_per_token == pytest.approx(4.6)
        assert advice.reason == "none meets 1 ms/token; the closest, 4.6 ms/token, misses it by 360 %"

    def test_the_mechanism_in_figures(self):
        """Each offloaded layer: a 1 ms copy (1 MB at 1 GB/s) and 0.1 ms of swaps; one more resident
        layer saves 0.9 ms and costs 1 MB (at the run's prefetch, where the slot pool keeps its size)."""
        mechanism = advise(hand_run(), target_ms=7.0).mechanism
        assert "each offloaded layer adds its copy, 1.00 ms (976.6 KiB at 1 GB/s), and 0.10 ms of pointer swaps" in mechanism
        assert "an offloaded layer computed 20 % faster than a resident one" in mechanism
        assert "each extra resident layer saves 0.90 ms per token and costs 976.6 KiB" in mechanism


class TestCaveats:
    def test_a_prefetch_other_than_the_runs_on_a_cpu(self):
        """The run copied at prefetch 1; the 7 ms target's choice has prefetch 0."""
        (caveat,) = advise(hand_run(), target_ms=7.0).caveats
        assert "measured at prefetch 1; at prefetch 0 a copy lands just before its layer" in caveat

    def test_none_when_the_choice_keeps_the_runs_prefetch(self):
        assert advise(hand_run()).caveats == []

    def test_none_for_prefetch_with_a_copy_engine(self):
        assert advise(hand_run(device="cuda:0"), target_ms=7.0).caveats == []

    def test_a_run_with_every_layer_offloaded(self):
        run = hand_run(offloaded=(True,) * 4, gpu_layers=0, prefetch=0)
        (caveat,) = advise(run).caveats
        assert caveat.startswith("every layer was offloaded in the run, so a layer's compute in the other state was not measured")
