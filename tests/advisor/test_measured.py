"""Extracting the measured figures: from hand-built step spans (expected figures by hand) and
from a real trace of `tracedoffload run` on a tiny model."""

from __future__ import annotations

import pytest

from tracedoffload import names
from tracedoffload.advisor.measured import TraceError, measured_run
from tracedoffload.tracing.exporters.jsonl import read_otlp_jsonl
from tracedoffload.tracing.spanview import SpanView

from .conftest import MS

SIZES = {
    names.MODEL_LAYER_BYTES: (1000, 1000),
    names.MODEL_BASE_BYTES: 500,
    names.MODEL_KV_BYTES_PER_TOKEN: 10,
    names.MODEL_ACTIVATION_BYTES_PER_TOKEN: 3,
    names.MODEL_LOGITS_BYTES: 40,
}
CONFIG = {
    names.OFFLOAD_GPU_LAYERS: 1,
    names.OFFLOAD_CPU_LAYERS: 1,
    names.OFFLOAD_PREFETCH: 1,
    names.OFFLOAD_RESIDENCY: "interleaved",
    names.OFFLOAD_DEVICE: "cpu",
}


def generation() -> SpanView:
    return SpanView("text_completion m", 1, 1, None, 0, 1, SIZES)


def step(start_ms: float, compute_ms=(1.0, 1.0), transfer_ms=1.0, release_ms=0.1, other_ms=0.5, *, phase="decode", sequences=1, tokens=1, kv=10, **extra) -> SpanView:
    """A 2-layer step (layer 0 resident, layer 1 offloaded) starting at `start_ms`, lasting its
    compute + transfer + release + other."""
    duration = sum(compute_ms) + transfer_ms + release_ms + other_ms
    attributes = {
        names.STEP_PHASE: phase,
        names.STEP_SEQUENCES: sequences,
        names.STEP_TOKENS: tokens,
        names.STEP_KV_TOKENS: kv,
        names.STEP_LAYERS_COMPUTE_NS: tuple(round(c * MS) for c in compute_ms),
        names.STEP_LAYERS_TRANSFER_NS: (0, round(transfer_ms * MS)),
        names.STEP_LAYERS_RELEASE_NS: (0, round(release_ms * MS)),
        names.STEP_LAYERS_WAIT_NS: (0, 0),
        names.STEP_LAYERS_TRANSFER_BYTES: (0, 1000),
        **CONFIG,
        **extra,
    }
    return SpanView(names.SPAN_STEP, 2, 2, None, round(start_ms * MS), round((start_ms + duration) * MS), attributes)


class TestFromHandBuiltSpans:
    def test_the_typical_steps_are_the_middle_half_by_period(self):
        """Decode steps start at 0, 10, 21, 33, 46 and 100 ms: periods 10, 11, 12, 13 and 54. The
        middle half (dropping one from each end of five) is 11, 12, 13: mean 12 ms, and every
        figure is the mean over those three steps (the one of 54 ms is left out)."""
        starts = [0, 10, 21, 33, 46, 100]
        computes = [(1, 1), (2, 2), (3, 3), (4, 4), (9, 9), (1, 1)]  # the steps of periods 11, 12, 13: 2, 3, 4
        spans = [generation(), step(-20, phase="prefill", tokens=30)] + [step(s, c) for s, c in zip(starts, computes)]
        run = measured_run(spans)
        (batch,) = run.batches
        assert batch.steps == 3
        assert batch.period_ns == pytest.approx(12 * MS)
        assert batch.compute_ns == pytest.approx((3 * MS, 3 * MS))
        # Each step lasts compute + 1.6 ms, so the gap is the period less that: (11 - 5.6 + 12 - 7.6 + 13 - 9.6) / 3.
        assert batch.gap_ns == pytest.approx((11 - 5.6 + 12 - 7.6 + 13 - 9.6) / 3 * MS)
        assert batch.other_ns == pytest.approx(0.5 * MS)
        assert batch.ms_per_token == pytest.approx(12.0)

    def test_rate_swap_sizes_and_configuration(self):
        """1000 bytes in 1 ms is 0.001 bytes/ns; the release 0.1 ms over one offloaded layer."""
        run = measured_run([generation(), step(0, phase="prefill", tokens=30), step(10), step(20), step(30)])
        assert run.transfer_bytes_per_ns == pytest.approx(0.001)
        assert run.swap_ns == pytest.approx(0.1 * MS)
        assert run.offloaded == (False, True)
        assert (run.gpu_layers, run.prefetch, run.residency, run.device, run.copy_engine) == (1, 1, "interleaved", "cpu", False)
        assert (run.layer_bytes, run.base_bytes, run.kv_bytes_per_token, run.activation_bytes_per_token, run.logits_bytes) == ((1000, 1000), 500, 10, 3, 40)
        assert run.largest_forward_tokens == 30

    def test_with_a_copy_engine_only_the_wait_is_on_the_step(self):
        """On CUDA the copies run beside compute: outside the layers is the duration less compute
        and waits (0.5 + 1 + 0.1 here, the copy and release counted as outside)."""
        config = {**CONFIG, names.OFFLOAD_DEVICE: "cuda:0"}
        run = measured_run([generation(), step(0, **config), step(10, **config), step(20, **config)])
        assert run.copy_engine
        assert run.batches[0].other_ns == pytest.approx(1.6 * MS)

    def test_steps_of_several_sequences_are_grouped_by_batch_size(self):
        """Steps of 1 and of 4 sequences: a figure per batch size, from steps followed by one of
        the same size (4 of 1: 3 pairs, all typical; 5 of 4: 4 pairs, the middle 2); KV tokens are
        the most held after any decode step of that size."""
        spans = [generation()]
        spans += [step(10 * i, sequences=1, kv=5 + i) for i in range(4)]
        spans += [step(100 + 20 * i, (3, 3), sequences=4, tokens=4, kv=40 + i) for i in range(5)]
        run = measured_run(spans)
        assert [(b.sequences, b.steps) for b in run.batches] == [(1, 3), (4, 2)]
        assert run.batch(4).period_ns == pytest.approx(20 * MS)
        assert run.batch(4).ms_per_token == pytest.approx(5.0)
        assert run.batch(4).kv_tokens == 44
        assert run.batch(1).kv_tokens == 8
        with pytest.raises(KeyError, match=r"no decode steps of 2 sequences: the run measured \[1, 4\]"):
            run.batch(2)


class TestRefused:
    def test_no_steps(self):
        with pytest.raises(TraceError, match="no step spans.*--trace-level token or layer"):
            measured_run([generation()])

    def test_no_model_sizes(self):
        with pytest.raises(TraceError, match=names.MODEL_LAYER_BYTES):
            measured_run([step(0), step(10), step(20)])

    def test_no_per_layer_figures(self):
        bare = [SpanView(s.name, 2, 2, None, s.start_ns, s.end_ns, {k: v for k, v in s.attributes.items() if not k.startswith("step.layers.")}) for s in (step(0), step(10))]
        with pytest.raises(TraceError, match="no per-layer figures step.layers.compute_ns"):
            measured_run([generation(), *bare])

    def test_two_configurations(self):
        with pytest.raises(TraceError, match="two offload configurations"):
            measured_run([generation(), step(0), step(10, **{names.OFFLOAD_PREFETCH: 2})])

    def test_too_few_decode_steps(self):
        with pytest.raises(TraceError, match="no two consecutive decode steps"):
            measured_run([generation(), step(0, phase="prefill"), step(10)])

    def test_no_offload_configuration(self):
        plain = SpanView(names.SPAN_STEP, 2, 2, None, 0, 1, {names.STEP_PHASE: "decode"})
        with pytest.raises(TraceError, match="no offload configuration"):
            measured_run([generation(), plain])


class TestFromARealRun:
    def test_the_tiny_runs_figures(self, tiny_trace):
        """The tiny 4-layer model, 2 resident (interleaved: layers 0 and 2), 8 tokens: 7 decode
        steps, so 6 followed by a decode step and their middle half, 4 (6 less one from each end)."""
        run = measured_run(read_otlp_jsonl(tiny_trace))
        assert (run.num_layers, run.gpu_layers, run.prefetch, run.residency, run.device) == (4, 2, 1, "interleaved", "cpu")
        assert run.offloaded == (False, True, False, True)
        (batch,) = run.batches
        assert (batch.sequences, batch.steps) == (1, 4)
        assert all(ns > 0 for ns in batch.compute_ns)
        assert run.transfer_bytes_per_ns > 0 and run.swap_ns > 0
        assert batch.period_ns > sum(batch.compute_ns)
        assert run.largest_forward_tokens > 1  # the prompt's prefill

    def test_the_sizes_match_the_bytes_each_copy_moved(self, tiny_trace):
        spans = list(read_otlp_jsonl(tiny_trace))
        run = measured_run(spans)
        decode = next(s for s in spans if s.name == names.SPAN_STEP and s.attributes[names.STEP_PHASE] == names.PHASE_DECODE)
        moved = decode.attributes[names.STEP_LAYERS_TRANSFER_BYTES]
        assert [run.layer_bytes[i] for i in (1, 3)] == [moved[1], moved[3]]
        assert run.kv_bytes_per_token > 0 and run.activation_bytes_per_token > 0 and run.logits_bytes > 0
