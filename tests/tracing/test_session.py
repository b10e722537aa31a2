"""The trace shape, timings and statistics of a traced offloaded generation, on the CPU path."""

from __future__ import annotations

import collections
import io
import json
import logging
import threading
import time

import pytest
import structlog
import torch
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracedoffload import ConfigError, OffloadConfig, TracingStateError, offload
from tracedoffload.logs import configure_logging
from tracedoffload import names
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import TracingSession

from .conftest import NUM_LAYERS, tiny_model, traced_generation


def by_trace(spans):
    traces = collections.defaultdict(list)
    for span in spans:
        traces[span.context.trace_id].append(span)
    return traces


def token_traces(spans):
    return {tid: group for tid, group in by_trace(spans).items() if any(s.name == names.SPAN_STEP for s in group)}


class TestTraceShape:
    def test_one_trace_per_token_linked_to_the_generation(self, full_detail_run):
        """Each token is its own trace whose root links to the single generation span."""
        _, spans, _ = full_detail_run
        generation = [s for s in spans if s.name == "text_completion tiny"]
        assert len(generation) == 1
        traces = token_traces(spans)
        assert len(traces) == 6
        for group in traces.values():
            roots = [s for s in group if s.name == names.SPAN_STEP]
            assert len(roots) == 1 and roots[0].parent is None
            assert [link.context.span_id for link in roots[0].links] == [generation[0].context.span_id]
            assert roots[0].attributes[names.GENERATION_ID] == generation[0].attributes[names.GENERATION_ID]

    def test_layer_spans_are_children_of_their_token(self, full_detail_run):
        """Every layer span's parent is the token span of its own trace."""
        _, spans, _ = full_detail_run
        for group in token_traces(spans).values():
            root = next(s for s in group if s.name == names.SPAN_STEP)
            for span in group:
                if span is not root:
                    assert span.name in names.LAYER_SPANS
                    assert span.parent.span_id == root.context.span_id

    def test_counts_per_token(self, full_detail_run):
        """A token has a compute span per layer and a transfer and release per offloaded layer."""
        _, spans, offloader = full_detail_run
        offloaded = len(offloader.offloaded_indices)
        for group in token_traces(spans).values():
            count = collections.Counter(s.name for s in group)
            assert count[names.SPAN_COMPUTE] == NUM_LAYERS
            assert count[names.SPAN_RELEASE] == offloaded
            # The last offloaded layer's release prefetches the next step's first one: +1 at most.
            assert count[names.SPAN_TRANSFER] in (offloaded, offloaded + 1)

    def test_phase_position_and_step_index(self, full_detail_run):
        """Step 0 is the prefill of the 5-token prompt; the rest are decode steps numbered in
        order, each one sequence at its own position, one new token each."""
        _, spans, _ = full_detail_run
        steps = sorted((s for s in spans if s.name == names.SPAN_STEP), key=lambda s: s.attributes[names.STEP_INDEX])
        assert [s.attributes[names.STEP_INDEX] for s in steps] == list(range(6))
        assert [s.attributes[names.STEP_PHASE] for s in steps] == ["prefill"] + ["decode"] * 5
        assert [s.attributes[names.STEP_POSITION] for s in steps] == [0, 5, 6, 7, 8, 9]
        assert [s.attributes[names.STEP_TOKENS] for s in steps] == [5, 1, 1, 1, 1, 1]
        assert {(s.attributes[names.STEP_SEQUENCES], s.attributes[names.STEP_GENERATED_TOKENS]) for s in steps} == {(1, 1)}
        # KV tokens held after each step: the prompt, then one more per step.
        assert [s.attributes[names.STEP_KV_TOKENS] for s in steps] == [5, 6, 7, 8, 9, 10]

    def test_a_batch_one_trace_stays_simple(self, full_detail_run):
        """Batch 1 keeps today's shape: a step names its one generation and links to it; no
        per-sequence arrays."""
        _, spans, _ = full_detail_run
        generation = next(s for s in spans if s.name.startswith("text_completion"))
        for step in (s for s in spans if s.name == names.SPAN_STEP):
            assert step.attributes[names.GENERATION_ID] == generation.attributes[names.GENERATION_ID]
            assert [link.context.span_id for link in step.links] == [generation.context.span_id]
            assert not any(key.startswith("step.sequence.") for key in step.attributes)

    def test_the_generation_reaches_each_of_its_steps(self, full_detail_run):
        """The generation span has one step event per forward that served it, carrying that
        step's trace and span ids, and its time to first token (to the prefill's end)."""
        _, spans, _ = full_detail_run
        generation = next(s for s in spans if s.name.startswith("text_completion"))
        steps = sorted((s for s in spans if s.name == names.SPAN_STEP), key=lambda s: s.attributes[names.STEP_INDEX])
        events = [e for e in generation.events if e.name == names.EVENT_STEP]
        assert [e.attributes[names.EVENT_STEP_TRACE_ID] for e in events] == [f"{s.context.trace_id:032x}" for s in steps]
        assert [e.attributes[names.EVENT_STEP_SPAN_ID] for e in events] == [f"{s.context.span_id:016x}" for s in steps]
        assert generation.attributes[names.GENERATION_STEPS] == 6
        assert generation.attributes[names.GENERATION_TTFT_NS] == steps[0].end_time - generation.start_time
        after_first = generation.end_time - steps[0].end_time
        assert generation.attributes[names.GENERATION_TPOT_NS] == round(after_first / 5)  # 6 output tokens
        assert generation.start_time <= steps[0].start_time and steps[-1].end_time <= generation.end_time

    def test_generation_carries_genai_attributes(self, full_detail_run):
        """The generation span has the GenAI semantic-convention attributes and the offload config."""
        _, spans, offloader = full_detail_run
        generation = next(s for s in spans if s.name == "text_completion tiny")
        attributes = generation.attributes
        assert attributes[names.GEN_AI_OPERATION_NAME] == "text_completion"
        assert attributes[names.GEN_AI_REQUEST_MODEL] == "tiny"
        assert attributes[names.GEN_AI_USAGE_INPUT_TOKENS] == 5
        assert attributes[names.GEN_AI_USAGE_OUTPUT_TOKENS] == 6
        assert attributes[names.OFFLOAD_CPU_LAYERS] == len(offloader.offloaded_indices)

    def test_generation_carries_the_planners_model_sizes(self, full_detail_run):
        """The generation span carries the planner's sizes of the model (what `advise` re-plans
        from): they equal a plan of a fresh copy of the model, and the offloaded layers' bytes equal
        what their transfers moved; step spans do not repeat them."""
        from tracedoffload.planner import ModelPlan

        _, spans, offloader = full_detail_run
        generation = next(s for s in spans if s.name == "text_completion tiny")
        plan = ModelPlan.from_model(tiny_model())
        attributes = generation.attributes
        assert tuple(attributes[names.MODEL_LAYER_BYTES]) == plan.layer_bytes
        assert attributes[names.MODEL_BASE_BYTES] == plan.base_bytes
        assert attributes[names.MODEL_KV_BYTES_PER_TOKEN] == plan.kv_bytes_per_token > 0
        assert attributes[names.MODEL_ACTIVATION_BYTES_PER_TOKEN] == plan.activation_bytes_per_token > 0
        assert attributes[names.MODEL_LOGITS_BYTES] == plan.logits_bytes > 0
        decode = next(s for s in spans if s.name == names.SPAN_STEP and s.attributes[names.STEP_PHASE] == names.PHASE_DECODE)
        moved = decode.attributes[names.STEP_LAYERS_TRANSFER_BYTES]
        assert offloader.offloaded_indices
        for index in offloader.offloaded_indices:
            assert attributes[names.MODEL_LAYER_BYTES][index] == moved[index]
        step = decode
        assert not set(names.MODEL_SIZE_ATTRIBUTES) & set(step.attributes)

    def test_one_trace_per_generation_switch(self, memory_exporter):
        """With per_step_traces off, tokens are children of the generation span in its trace."""
        session = TracingSession([memory_exporter], policy=SamplingPolicy.full_detail(), per_step_traces=False)
        traced_generation(session).detach()
        session.shutdown(10)
        spans = memory_exporter.get_finished_spans()
        assert len({s.context.trace_id for s in spans}) == 1
        generation = next(s for s in spans if s.name.startswith("text_completion"))
        tokens = [s for s in spans if s.name == names.SPAN_STEP]
        assert tokens and all(t.parent.span_id == generation.context.span_id and not t.links for t in tokens)


class TestTimestamps:
    def test_layer_spans_nest_inside_their_token(self, full_detail_run):
        """Every layer span starts and ends within its token span, and ends after it starts."""
        _, spans, _ = full_detail_run
        for group in token_traces(spans).values():
            root = next(s for s in group if s.name == names.SPAN_STEP)
            for span in group:
                assert root.start_time <= span.start_time <= span.end_time <= root.end_time

    def test_computes_are_sequential_and_copies_land_first(self, full_detail_run):
        """Computes follow layer order without overlapping, and a layer's copy ends before its compute."""
        _, spans, _ = full_detail_run
        for group in token_traces(spans).values():
            computes = sorted((s for s in group if s.name == names.SPAN_COMPUTE), key=lambda s: s.start_time)
            assert [c.attributes[names.LAYER_INDEX] for c in computes] == list(range(NUM_LAYERS))
            for before, after in zip(computes, computes[1:]):
                assert before.end_time <= after.start_time
            for transfer in (s for s in group if s.name == names.SPAN_TRANSFER):
                layer = transfer.attributes[names.LAYER_INDEX]
                compute = next((c for c in computes if c.attributes[names.LAYER_INDEX] == layer and c.start_time >= transfer.end_time), None)
                later_token = compute is None  # the wrap-around prefetch is computed in the next token
                assert later_token or transfer.end_time <= compute.start_time

    def test_timestamps_are_wall_clock(self, full_detail_run):
        """Span times are anchored to wall-clock time (within a minute of now)."""
        _, spans, _ = full_detail_run
        now = time.time_ns()
        assert all(abs(s.start_time - now) < 60e9 for s in spans)


class TestStatistics:
    def test_breakdown_equals_an_independent_sum_over_exported_spans(self, full_detail_run):
        """transfer, compute and release totals equal the sums of the exported layer span durations."""
        session, spans, _ = full_detail_run
        stats = session.snapshot()
        total = collections.Counter()
        for span in spans:
            total[span.name] += span.end_time - span.start_time
        breakdown = stats["time_breakdown"]
        assert breakdown["cpu_to_gpu_transfer_ms"] == round(total[names.SPAN_TRANSFER] / 1e6, 3)
        assert breakdown["pure_computation_ms"] == round(total[names.SPAN_COMPUTE] / 1e6, 3)
        assert breakdown["gpu_to_cpu_release_ms"] == round(total[names.SPAN_RELEASE] / 1e6, 3)
        assert stats["transfer_overhead_ms"] == round((total[names.SPAN_TRANSFER] + total[names.SPAN_RELEASE]) / 1e6, 3)

    def test_seed_fields_are_never_zero_when_offloading(self, full_detail_run):
        """Every time field of the seeds' schema is measured, never a zero placeholder."""
        session, _, offloader = full_detail_run
        stats = session.snapshot()
        assert stats["enabled"] is True
        assert stats["gpu_layers"] == 3 and stats["cpu_layers"] == 3
        assert all(v > 0 for v in stats["time_breakdown"].values())
        assert stats["avg_layer_transfer_ms"] > 0 and 0 < stats["overhead_percentage"] < 100
        assert stats["vram_saved_gb"] == round((offloader.offloaded_bytes - offloader.device_pool_bytes) / 1e9, 4)

    def test_latency_percentiles_and_slowest_steps(self, full_detail_run):
        """Percentiles are ordered and the slowest steps name their trace ids."""
        session, spans, _ = full_detail_run
        stats = session.snapshot()
        latency = stats["step_latency_ms"]
        assert latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
        token_ids = {f"{s.context.trace_id:032x}" for s in spans if s.name == names.SPAN_STEP}
        assert {t["trace_id"] for t in stats["slowest_steps"]} <= token_ids
        durations = [t["ms"] for t in stats["slowest_steps"]]
        assert durations == sorted(durations, reverse=True)

    def test_per_layer_breakdown_covers_every_layer(self, full_detail_run):
        """The per-layer table has a row for each layer; only offloaded ones have transfers."""
        session, _, offloader = full_detail_run
        per_layer = session.snapshot()["per_layer"]
        assert sorted(per_layer) == list(range(NUM_LAYERS))
        for index, row in per_layer.items():
            assert row["computes"] == 6
            assert (row["transfers"] > 0) == (index in offloader.offloaded_indices)

    def test_stats_see_every_span_when_export_is_sampled(self, memory_exporter):
        """With the default tail rule, fewer spans are exported but the totals cover every token."""
        session = TracingSession([memory_exporter], policy=SamplingPolicy(first_tokens=1, every_n=1000, relative_to_p95=None))
        traced_generation(session, new_tokens=8).detach()
        session.shutdown(10)
        spans = memory_exporter.get_finished_spans()
        stats = session.snapshot()
        assert stats["steps"] == 8 and stats["generated_tokens"] == 8
        assert stats["layer_detail_steps"] == 1
        exported_computes = sum(1 for s in spans if s.name == names.SPAN_COMPUTE)
        assert exported_computes == NUM_LAYERS
        assert sum(row["computes"] for row in stats["per_layer"].values()) == 8 * NUM_LAYERS


class TestLevels:
    def test_token_level_exports_no_layer_spans(self, memory_exporter):
        """At level "token", token and generation spans are exported and layer spans are not."""
        session = TracingSession([memory_exporter], policy=SamplingPolicy(level="token"))
        traced_generation(session).detach()
        session.shutdown(10)
        names_seen = {s.name for s in memory_exporter.get_finished_spans()}
        assert names_seen == {names.SPAN_STEP, "text_completion tiny"}
        assert session.snapshot()["time_breakdown"]["pure_computation_ms"] > 0

    def test_generation_level_exports_only_the_generation(self, memory_exporter):
        """At level "generation", only the generation span leaves the process."""
        session = TracingSession([memory_exporter], policy=SamplingPolicy(level="generation"))
        traced_generation(session).detach()
        session.shutdown(10)
        assert [s.name for s in memory_exporter.get_finished_spans()] == ["text_completion tiny"]

    def test_off_records_nothing(self, memory_exporter):
        """At level "off" the offloader keeps its no-op timeline and no span is made."""
        session = TracingSession([memory_exporter], policy=SamplingPolicy(level="off"))
        offloader = traced_generation(session)
        assert type(offloader.timeline).__name__ == "NullTimeline" and not offloader.timeline.wants_markers
        offloader.detach()
        session.shutdown(10)
        assert memory_exporter.get_finished_spans() == ()
        assert session.snapshot()["enabled"] is False


class StuckExporter(SpanExporter):
    """A test fake: an exporter whose first export does not return until the test releases it
    (a backend that stopped answering)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()

    def export(self, spans):
        self.entered.set()
        self.release.wait(120)
        self.returned.set()
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass


class FailingExporter(SpanExporter):
    """A test fake: an exporter whose backend answers errors."""

    def export(self, spans):
        return SpanExportResult.FAILURE

    def shutdown(self):
        pass


class TestNeverInTheWay:
    def test_a_stuck_exporter_does_not_block_generation_or_shutdown(self):
        """An exporter that never returns holds neither the generation nor shutdown: both end
        while it is still inside its export (ordering, not timing: no host is too slow for it)."""
        exporter = StuckExporter()
        session = TracingSession([exporter], policy=SamplingPolicy.full_detail(), batch_interval_s=0.0)
        try:
            traced_generation(session, new_tokens=3, flush=False).detach()
            assert exporter.entered.wait(60), "the exporter was never called"
            traced_generation(session, new_tokens=3, flush=False).detach()  # with the exporter stuck
            assert not exporter.returned.is_set()
            session.shutdown(timeout_s=0.5)
            assert not exporter.returned.is_set()
            assert session.snapshot()["dropped_spans"] > 0
        finally:
            exporter.release.set()

    def test_failed_exports_are_counted(self):
        """Spans an exporter fails to send are counted as dropped, and the stats are still complete."""
        session = TracingSession([FailingExporter()], policy=SamplingPolicy.full_detail())
        traced_generation(session).detach()
        session.shutdown(5)
        stats = session.snapshot()
        assert stats["dropped_spans"] > 0
        assert stats["steps"] == 6

    def test_a_raising_listener_is_counted_not_raised(self):
        """An error on the telemetry thread is logged and counted; the generation completes."""
        session = TracingSession([], policy=SamplingPolicy.full_detail())

        def explode(timing, stats):
            raise RuntimeError("listener bug")

        session.add_step_listener(explode)
        traced_generation(session).detach()
        session.shutdown(5)
        assert session.snapshot()["telemetry_errors"] == 6

    def test_a_full_queue_drops_steps_without_blocking(self):
        """When the telemetry thread falls behind, new steps are dropped and counted, never waited
        for: the generation ends while the telemetry thread is still held."""
        release = threading.Event()
        session = TracingSession([], policy=SamplingPolicy.full_detail(), max_queued_steps=1)
        returned = threading.Event()

        def held(timing, stats):
            release.wait(120)
            returned.set()

        session.add_step_listener(held)
        try:
            traced_generation(session, new_tokens=6, flush=False).detach()
            assert not returned.is_set()
        finally:
            release.set()
        session.shutdown(30)
        stats = session.snapshot()
        assert stats["dropped_steps"] > 0
        assert stats["steps"] + stats["dropped_steps"] == 6
        assert stats["generations"] == 1  # its end is never dropped


def log_events_of_one_traced_forward(exporter, hook) -> list[dict]:
    """Run one traced forward of the tiny model with `hook(logger)` called inside layer 2, logging
    as JSON; return the events logged."""
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    try:
        session = TracingSession([exporter], policy=SamplingPolicy.full_detail())
        model = tiny_model()
        offloader = offload(model, OffloadConfig(num_layers_on_gpu=3))
        session.attach(offloader)
        logger = structlog.get_logger("test")
        model.model.layers[2].register_forward_hook(lambda *_: hook(logger))
        with torch.inference_mode(), session.generation("tiny", input_tokens=5):
            model(torch.arange(5).unsqueeze(0))
        session.shutdown(5)
        offloader.detach()
    finally:
        configure_logging("console")
    return [json.loads(line) for line in stream.getvalue().splitlines()]


class TestLogCorrelation:
    def test_events_logged_during_a_token_carry_its_trace_id(self, memory_exporter):
        """A structlog event emitted inside a layer's forward carries that token's trace and span ids."""
        events = log_events_of_one_traced_forward(memory_exporter, lambda logger: logger.info("inside.layer"))
        event = next(e for e in events if e["event"] == "inside.layer")
        token = next(s for s in memory_exporter.get_finished_spans() if s.name == names.SPAN_STEP)
        assert event["trace_id"] == f"{token.context.trace_id:032x}"
        assert event["span_id"] == f"{token.context.span_id:016x}"

    def test_events_logged_on_another_thread_during_a_token_carry_no_token_ids(self, memory_exporter):
        """An exporter's or any other thread's event while a token computes is not that token's."""

        def log_here_and_from_another_thread(logger):
            other = threading.Thread(target=lambda: logger.info("elsewhere"))
            other.start()
            other.join()
            logger.info("here")

        events = {e["event"]: e for e in log_events_of_one_traced_forward(memory_exporter, log_here_and_from_another_thread)}
        assert "trace_id" in events["here"]
        assert "trace_id" not in events["elsewhere"] and "span_id" not in events["elsewhere"]

    def test_the_sdks_own_log_lines_are_rendered_like_ours(self):
        """The OpenTelemetry SDK logs through the standard library (export retries, failures): with
        --log-format json those lines are JSON too, on the same stream."""
        stream = io.StringIO()
        configure_logging("json", stream=stream)
        try:
            logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").warning("Transient error %s, retrying", "UNAVAILABLE")
        finally:
            configure_logging("console")
        (line,) = stream.getvalue().splitlines()
        event = json.loads(line)
        assert event["event"] == "Transient error UNAVAILABLE, retrying"
        assert event["level"] == "warning"
        assert event["logger"] == "opentelemetry.exporter.otlp.proto.grpc.exporter"


class TestMisuse:
    def test_exporters_must_be_a_list_of_exporters(self):
        """A string (or anything but a sequence of SpanExporters) is refused, naming the field."""
        for bad in ("not a list", [object()], None):
            with pytest.raises(ConfigError, match="exporters="):
                TracingSession(bad)

    def test_a_second_session_on_a_traced_offloader_is_refused(self, memory_exporter):
        """Two sessions on one offloader would split its steps: the second attach raises."""
        first, second = TracingSession([memory_exporter]), TracingSession([])
        offloader = offload(tiny_model(), OffloadConfig(num_layers_on_gpu=3))
        try:
            first.attach(offloader)
            with pytest.raises(TracingStateError, match="already traced by another TracingSession"):
                second.attach(offloader)
            first.attach(offloader)  # the same session again is fine
        finally:
            first.shutdown(5)
            second.shutdown(5)
            offloader.detach()

    def test_attaching_to_a_detached_offloader_is_refused(self):
        """A detached offloader runs no hooks: tracing it would record nothing, so it raises."""
        session = TracingSession([])
        offloader = offload(tiny_model(), OffloadConfig(num_layers_on_gpu=3))
        offloader.detach()
        with pytest.raises(TracingStateError, match="the offloader is detached"):
            session.attach(offloader)
        session.shutdown(5)

    def test_a_generation_after_shutdown_is_refused(self):
        """A shut-down session records nothing: opening a generation on it raises, as does attach."""
        session = TracingSession([])
        session.shutdown(5)
        with pytest.raises(TracingStateError, match="shut down"):
            with session.generation("m", 3):
                pass
        offloader = offload(tiny_model(), OffloadConfig(num_layers_on_gpu=3))
        try:
            with pytest.raises(TracingStateError, match="shut down"):
                session.attach(offloader)
        finally:
            offloader.detach()


class TestConcurrentGenerations:
    def test_generations_open_in_two_threads_each_get_their_own_steps(self, memory_exporter):
        """Two generations open at once in two threads, their forwards strictly alternating on
        one model: every step is attributed to the generation of the thread that ran it, each
        numbered from 0 (once, the step after a switch carried the other's id, and steps after the
        first generation ended belonged to none)."""
        session = TracingSession([memory_exporter], policy=SamplingPolicy(level="token"))
        model = tiny_model()
        offloader = offload(model, OffloadConfig(num_layers_on_gpu=3))
        session.attach(offloader)
        turn = threading.Condition()
        state = {"next": 0, "ids": {}}
        steps = {0: 6, 1: 4}

        def generate(me: int) -> None:
            with torch.inference_mode(), session.generation("tiny", 5) as handle:
                state["ids"][me] = handle.generation_id
                for step in range(steps[me]):
                    with turn:
                        # Alternate while both run; the longer one goes on alone after.
                        assert turn.wait_for(lambda: state["next"] == me or step >= steps[1 - me], timeout=60)
                        # The prompt, then one token per step (no cache: only the shapes matter).
                        model(torch.arange(5).unsqueeze(0) if step == 0 else torch.tensor([[1]]))
                        state["next"] = 1 - me
                        turn.notify_all()

        threads = [threading.Thread(target=generate, args=(me,)) for me in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        session.shutdown(10)
        offloader.detach()
        spans = memory_exporter.get_finished_spans()
        step_spans = [s for s in spans if s.name == names.SPAN_STEP]
        for me, count in steps.items():
            mine = sorted((s for s in step_spans if s.attributes.get(names.GENERATION_ID) == state["ids"][me]), key=lambda s: s.start_time)
            assert [s.attributes[names.STEP_POSITION] for s in mine] == [0] + [5 + n for n in range(count - 1)], me
            assert [s.attributes[names.STEP_PHASE] for s in mine] == ["prefill"] + ["decode"] * (count - 1)
            generation = next(s for s in spans if s.attributes.get(names.GENERATION_ID) == state["ids"][me] and s.name.startswith("text_completion"))
            assert all([link.context.span_id for link in s.links] == [generation.context.span_id] for s in mine)
            assert len([e for e in generation.events if e.name == names.EVENT_STEP]) == count
        assert len(step_spans) == sum(steps.values())
