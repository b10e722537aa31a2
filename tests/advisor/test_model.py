"""The time and memory model on hand-built figures; every expected number is derived by hand
(see `hand_run` in conftest.py for the run's figures)."""

from __future__ import annotations

import dataclasses

import pytest

from tracedoffload.advisor.memory import peak_device_memory
from tracedoffload.advisor.model import Choice, StepTime, layer_compute_ns, offloaded_compute_factor, overlapped_step_ns, predict_step

from .conftest import MS, hand_run


def with_batch(run, sequences):
    """The run with its one batch's figures as if its steps had served `sequences` sequences."""
    return dataclasses.replace(run, batches=(dataclasses.replace(run.batches[0], sequences=sequences),))


class TestComputeState:
    def test_the_factor_is_offloaded_over_resident(self):
        """Offloaded layers computed 0.8 ms, resident ones 1 ms: 0.8."""
        assert offloaded_compute_factor(hand_run(), 1) == pytest.approx(0.8)

    def test_a_layer_that_changes_state_is_scaled(self):
        """A resident layer offloaded computes 0.8 x 1 ms; an offloaded one made resident 0.8 / 0.8 ms."""
        resident, offloaded = layer_compute_ns(hand_run(), 1)
        assert resident == pytest.approx((1 * MS, 1 * MS, 1 * MS, 1 * MS))
        assert offloaded == pytest.approx((0.8 * MS, 0.8 * MS, 0.8 * MS, 0.8 * MS))

    def test_one_state_only_gives_no_factor(self):
        """A run with every layer resident cannot tell the two states apart: 1."""
        run = hand_run(offloaded=(False,) * 4, gpu_layers=4)
        assert offloaded_compute_factor(run, 1) == 1.0


class TestWithoutCopyEngine:
    def test_the_runs_own_configuration_is_its_measured_period(self):
        """2 resident: compute 3.6, copies 2 x 1 + swaps 2 x 2 x 0.05, other 0.5 - 2 x 0.05: 6.2 ms
        a step, plus the 0.2 ms gap: 6.4 ms, the run's measured period."""
        time = predict_step(hand_run(), Choice(2, "interleaved", 1))
        assert (time.compute_ns, time.offload_ns, time.other_ns) == pytest.approx((3.6 * MS, 2.2 * MS, 0.4 * MS))
        assert time.ms_per_token == pytest.approx(6.4)

    def test_every_layer_resident(self):
        """4 resident: compute 4 x 1 ms, nothing offloaded, other 0.4: 4.4 + 0.2 = 4.6 ms."""
        assert predict_step(hand_run(), Choice(4, "interleaved", 1)).ms_per_token == pytest.approx(4.6)

    def test_every_layer_offloaded(self):
        """0 resident: compute 4 x 0.8, copies 4 x 1, swaps 4 x 0.1, other 0.4: 8.0 + 0.2 = 8.2 ms."""
        assert predict_step(hand_run(), Choice(0, "interleaved", 0)).ms_per_token == pytest.approx(8.2)

    def test_prefetch_and_residency_change_nothing_on_a_cpu(self):
        """The same cores copy and compute: only how many layers are copied counts."""
        for residency in ("first", "last"):
            for prefetch in (0, 1, 4):
                assert predict_step(hand_run(), Choice(2, residency, prefetch)).ms_per_token == pytest.approx(6.4)

    def test_a_batch_divides_the_step_by_its_sequences(self):
        """A step of 4 sequences makes 4 tokens: 6.4 ms a step is 1.6 ms a token."""
        assert predict_step(with_batch(hand_run(), 4), Choice(2, "interleaved", 1, sequences=4)).ms_per_token == pytest.approx(1.6)

    def test_a_run_that_copied_nothing_predicts_only_all_resident(self):
        run = hand_run(offloaded=(False,) * 4, gpu_layers=4, transfer_bytes_per_ns=None)
        assert predict_step(run, Choice(4, "interleaved", 1)).ms_per_token > 0
        with pytest.raises(ValueError, match="no copy rate"):
            predict_step(run, Choice(3, "interleaved", 1))


class TestCopyEngineSimulation:
    def test_a_copy_longer_than_the_compute_before_it_shows(self):
        """Layer 1's 3 ms copy waits for its one slot, freed when layer 1 ended the step before; it
        runs beside layer 0's 1 ms: 3 + 1 = 4 ms a step (serially it would be 5)."""
        assert overlapped_step_ns([1, 1], [0, 3], [False, True], 1, 0) == pytest.approx(4)

    def test_a_copy_shorter_than_the_compute_before_it_is_hidden(self):
        """Layer 1's 2 ms copy lands while layer 0 computes 3 ms: the step is the compute, 4 ms."""
        assert overlapped_step_ns([3, 1], [0, 2], [False, True], 1, 0) == pytest.approx(4)

    def test_one_slot_serialises_copy_and_compute(self):
        """3 offloaded layers, 1 ms compute and 1.5 ms copy each, one slot: each copy waits for the
        previous layer's compute; only the first overlaps the 2 ms outside the layers:
        2 + 1 + 2 x (1.5 + 1) = 8 ms."""
        assert overlapped_step_ns([1, 1, 1], [1.5, 1.5, 1.5], [True] * 3, 1, 2) == pytest.approx(8)

    def test_two_slots_let_copies_run_ahead(self):
        """Two slots, nothing outside the layers: copies run back to back (copy g needs the slot of
        copy g - 2, freed 0.5 ms before the copy stream is free), copy-bound at 3 x 1.5 = 4.5 ms.
        With 2 ms outside the layers, from the end E of the last layer: layer 0's copy lands during
        those 2 ms, layer 1's at E + 2, but layer 2's copy must wait for layer 0's compute (E + 3)
        to free its slot and lands at E + 4.5, half a millisecond after layer 1 ends: 5.5 ms."""
        assert overlapped_step_ns([1, 1, 1], [1.5, 1.5, 1.5], [True] * 3, 2, 0) == pytest.approx(4.5)
        assert overlapped_step_ns([1, 1, 1], [1.5, 1.5, 1.5], [True] * 3, 2, 2) == pytest.approx(5.5)

    def test_a_cuda_run_hides_the_copies_behind_resident_layers(self):
        """On CUDA, 2 resident: each 1 ms copy lands behind a resident layer's 1 ms, so the step is
        compute 3.6 + other 0.5 (swaps are host work, hidden): 4.1 + 0.2 = 4.3 ms."""
        time = predict_step(hand_run(device="cuda:0"), Choice(2, "interleaved", 1))
        assert time.offload_ns == pytest.approx(0, abs=1)
        assert time.ms_per_token == pytest.approx(4.3)

    def test_a_cuda_run_with_every_layer_offloaded_depends_on_prefetch(self):
        """0 resident, 0.8 ms compute and 1 ms copy each. Prefetch 0 (one slot): the first copy
        beside the 0.5 ms outside, then copy and compute in turn: 4 x 1.8 = 7.2 + 0.2 = 7.4 ms.
        Prefetch 1 (two slots), a steady step from its start T: layers 0 and 1's copies land at
        T - 0.3 and T + 0.7 (issued in the previous step's tail), so layer 0 computes T to T + 0.8 and
        layer 1 T + 0.8 to T + 1.6; layer 2's copy needs layer 0's slot, free at T + 0.8, lands at
        T + 1.8 and layer 2 computes to T + 2.6; layer 3's copy waits for the copy stream (free at
        T + 1.8), lands at T + 2.8, and layer 3 computes to T + 3.6; 0.5 outside: 4.1 ms a step,
        + 0.2 = 4.3 ms (copies alone would need 4.0)."""
        run = hand_run(device="cuda:0")
        assert predict_step(run, Choice(0, "interleaved", 0)).ms_per_token == pytest.approx(7.4)
        assert predict_step(run, Choice(0, "interleaved", 1)).ms_per_token == pytest.approx(4.3)


class TestMemory:
    def test_the_runs_own_configuration(self):
        """Base 10 MB + 2 resident layers 2 MB + 2 slots 2 MB + KV 100 x 1000 + activations
        50 x 10 + 2000 = 14,102,500 bytes."""
        memory = peak_device_memory(hand_run(), Choice(2, "interleaved", 1))
        assert (memory.resident_layer_bytes, memory.slot_pool_bytes, memory.kv_cache_bytes, memory.activation_bytes) == (2_000_000, 2_000_000, 100_000, 2500)
        assert memory.total_bytes == 14_102_500

    def test_prefetch_costs_a_slot(self):
        """Prefetch 0: one slot, 1 MB less."""
        assert peak_device_memory(hand_run(), Choice(2, "interleaved", 0)).total_bytes == 13_102_500

    def test_every_layer_resident_has_no_slot_pool(self):
        assert peak_device_memory(hand_run(), Choice(4, "interleaved", 4)).total_bytes == 14_102_500

    def test_a_batch_adds_a_logits_row_per_sequence(self):
        """4 sequences at once: 3 more rows of 2000 bytes of logits than the run's 14,102,500."""
        assert peak_device_memory(with_batch(hand_run(), 4), Choice(2, "interleaved", 1, sequences=4)).total_bytes == 14_108_500


def test_step_time_adds_its_terms():
    time = StepTime(compute_ns=3 * MS, offload_ns=2 * MS, other_ns=1 * MS, gap_ns=2 * MS, sequences=2)
    assert time.step_ns == 6 * MS
    assert time.ms_per_token == pytest.approx(4.0)
