"""The tail rule: which steps get their layer spans exported, and why."""

from __future__ import annotations

import math

import pytest
from tests.logcapture import capture_logs

from tracedoffload._exceptions import ConfigError
from tracedoffload import names
from tracedoffload.tracing.sampling import SamplingPolicy, TailSampler
from tracedoffload.tracing.session import TracingSession

from .conftest import traced_generation

MS = 1_000_000


def decisions(policy: SamplingPolicy, durations_ms: list[float]) -> list[str | None]:
    sampler = TailSampler(policy)
    # One generation, one step per token: step n is among its first `first_tokens` when n < it.
    return [sampler.decide(index < policy.first_tokens, int(ms * MS)) for index, ms in enumerate(durations_ms)]


class TestTailSampler:
    def test_first_tokens_then_one_in_n(self):
        policy = SamplingPolicy(first_tokens=2, every_n=3, relative_to_p95=None)
        assert decisions(policy, [10] * 10) == ["first", "first", None, None, "every_n", None, None, "every_n", None, None]

    def test_absolute_threshold_picks_slow_tokens_and_restarts_the_count(self):
        policy = SamplingPolicy(first_tokens=0, every_n=3, slow_token_ms=50, relative_to_p95=None)
        assert decisions(policy, [10, 10, 60, 10, 10, 10]) == [None, None, "slow", None, None, "every_n"]

    def test_relative_rule_waits_for_twenty_tokens_then_compares_with_the_running_p95(self):
        policy = SamplingPolicy(first_tokens=0, every_n=1000, relative_to_p95=1.5)
        steady = [10.0 + (i % 5) for i in range(19)]  # p95 of these is 14 ms
        assert decisions(policy, [*steady, 100.0]) == [None] * 19 + [None]  # only 19 seen before it
        assert decisions(policy, [*steady, 12.0, 20.0, 22.0]) == [None] * 20 + [None, "relative"]  # 20 < 1.5 x 14 < 22

    def test_the_running_p95_only_remembers_its_window(self):
        """After a slow phase leaves the window, normal tokens are judged against normal ones again."""
        policy = SamplingPolicy(first_tokens=0, every_n=1000, relative_to_p95=1.5, window=20)
        slow_phase = [100.0] * 20
        normal = [10.0] * 20
        assert decisions(policy, [*slow_phase, *normal, 30.0])[-1] == "relative"

    def test_full_detail_and_levels_below_layer(self):
        assert decisions(SamplingPolicy.full_detail(), [10, 1000]) == ["all", "all"]
        for level in ("off", "generation", "token"):
            assert decisions(SamplingPolicy(level=level, slow_token_ms=1), [10, 1000]) == [None, None]

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("slow_token_ms", "5"),
            ("slow_token_ms", math.nan),
            ("slow_token_ms", math.inf),
            ("slow_token_ms", 0),
            ("slow_token_ms", True),
            ("relative_to_p95", "1.5"),
            ("relative_to_p95", -1.0),
            ("every_n", 0),
            ("every_n", 2.5),
            ("first_tokens", -1),
            ("window", 4),
            ("level", "layers"),
        ],
    )
    def test_bad_settings_name_the_field(self, field, value):
        with pytest.raises(ConfigError) as caught:
            SamplingPolicy(**{field: value})
        assert caught.value.field == ("trace_level" if field == "level" else field)


class TestSlowTokensInTheTrace:
    def test_a_slow_token_gets_its_layers_an_event_and_a_log_line_with_its_trace_id(self, memory_exporter):
        """With a threshold every token exceeds, each token after the first ones is exported as slow."""
        session = TracingSession([memory_exporter], policy=SamplingPolicy(first_tokens=1, slow_token_ms=1e-6, relative_to_p95=None))
        with capture_logs() as logs:
            traced_generation(session, new_tokens=4).detach()
            session.shutdown(10)
        spans = memory_exporter.get_finished_spans()
        tokens = sorted((s for s in spans if s.name == names.SPAN_STEP), key=lambda s: s.attributes[names.STEP_INDEX])
        assert [t.attributes[names.STEP_SAMPLED_BY] for t in tokens] == ["first", "slow", "slow", "slow"]
        for token in tokens[1:]:
            assert [e.name for e in token.events] == [names.EVENT_SLOW_STEP]
            assert token.events[0].attributes["reason"] == "slow"
            assert any(s.parent is not None and s.parent.span_id == token.context.span_id for s in spans)
        slow_lines = [line for line in logs if line["event"] == "step.slow"]
        assert [line["trace_id"] for line in slow_lines] == [f"{t.context.trace_id:032x}" for t in tokens[1:]]

    def test_sampled_out_tokens_have_no_layer_spans_but_full_statistics(self, memory_exporter):
        session = TracingSession([memory_exporter], policy=SamplingPolicy(first_tokens=1, every_n=1000, relative_to_p95=None))
        traced_generation(session, new_tokens=4).detach()
        session.shutdown(10)
        spans = memory_exporter.get_finished_spans()
        sampled_out = [s for s in spans if s.name == names.SPAN_STEP and s.attributes[names.STEP_SAMPLED_BY] == "none"]
        assert len(sampled_out) == 3
        assert not any(s.parent is not None and s.parent.span_id in {t.context.span_id for t in sampled_out} for s in spans)
        assert session.snapshot()["steps"] == 4
        assert session.snapshot()["layer_detail_steps"] == 1
