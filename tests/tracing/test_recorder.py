"""The hot-path recorder: one payload per step, each read against one clock anchor, re-anchored
between steps of a long generation."""

from __future__ import annotations

import itertools

from tracedoffload.timeline import COMPUTE, LayerRecord
from tracedoffload import names
from tracedoffload.tracing import recorder
from tracedoffload.tracing.recorder import GenerationInfo, TracingTimeline
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import TracingSession

from .conftest import traced_generation


def run_steps(timeline: TracingTimeline, steps: int) -> None:
    timeline.reanchor_now("first")  # as a session does when a generation opens on an idle model
    timeline.open_in_context([GenerationInfo("g", None, True, 1, 0)])
    for step in range(steps):
        timeline.step_begin(step * 10)
        timeline.layer(LayerRecord(COMPUTE, 0, step * 10 + 1, step * 10 + 2, 0, -1, False))
        timeline.step_end(step * 10 + 3)


class TestReanchoring:
    def test_each_step_after_the_interval_gets_a_fresh_anchor(self, monkeypatch):
        monkeypatch.setattr(recorder, "REANCHOR_EVERY_S", 0.0)
        payloads = []
        fresh = (f"anchor-{n}" for n in itertools.count(1))
        timeline = TracingTimeline(lambda p: payloads.append(p) or True, "unused", {}, reanchor=lambda: next(fresh))
        run_steps(timeline, 3)
        # The generation's own anchor for the first step, then one taken after each hand-over.
        assert [p.anchor for p in payloads] == ["first", "anchor-1", "anchor-2"]

    def test_within_the_interval_the_anchor_is_kept(self):
        payloads = []
        timeline = TracingTimeline(lambda p: payloads.append(p) or True, "unused", {}, reanchor=lambda: "fresh")
        run_steps(timeline, 3)
        assert {p.anchor for p in payloads} == {"first"}

    def test_spans_stay_ordered_and_nested_when_every_step_is_reanchored(self, monkeypatch, memory_exporter):
        monkeypatch.setattr(recorder, "REANCHOR_EVERY_S", 0.0)
        session = TracingSession([memory_exporter], policy=SamplingPolicy.full_detail())
        traced_generation(session, new_tokens=5).detach()
        session.shutdown(10)
        spans = memory_exporter.get_finished_spans()
        tokens = sorted((s for s in spans if s.name == names.SPAN_STEP), key=lambda s: s.attributes[names.STEP_INDEX])
        assert len(tokens) == 5
        for earlier, later in itertools.pairwise(tokens):
            # Two host-clock anchors can differ by the time between their two reads: well under 1 ms.
            assert earlier.end_time <= later.start_time + 1_000_000
        for token in tokens:
            children = [s for s in spans if s.parent is not None and s.parent.span_id == token.context.span_id]
            assert children
            assert all(token.start_time <= c.start_time <= c.end_time <= token.end_time for c in children)
