"""A session across process boundaries: a forked child (a pre-forking server's worker) and exit.

The child is a real `os.fork` of the test process; a lock held at the fork is held for ever in
the child, which is the fault a pre-forking server would hit.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import time
import traceback

import pytest
import structlog
import torch

from tracedoffload.logs import configure_logging
from tracedoffload.tracing.exporters.jsonl import read_otlp_jsonl
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import TracingSession

from .conftest import PROMPT_TOKENS, tiny_model, traced_generation

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def run_in_fork(child, timeout_s: float = 60.0) -> int:
    """Run `child()` in a forked process; its exit code (0: returned, 1: raised), or fail on a hang."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            child()
        except BaseException:  # noqa: BLE001 - reported through the exit code
            traceback.print_exc()
            code = 1
        os._exit(code)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child hung for {timeout_s} s")


def generate(model, session: TracingSession, new_tokens: int = 4) -> None:
    prompt = torch.arange(PROMPT_TOKENS).unsqueeze(0)
    with torch.inference_mode(), session.generation("tiny", input_tokens=PROMPT_TOKENS) as handle:
        out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        handle.output_tokens = out.shape[1] - PROMPT_TOKENS


class TestForkedChild:
    def test_inherited_session_drops_and_counts_without_touching_the_parents_threads(self, memory_exporter):
        session = TracingSession([memory_exporter], policy=SamplingPolicy.full_detail())
        offloader = traced_generation(session, new_tokens=3)
        tokens_before = session.stats.steps

        def child():
            torch.set_num_threads(1)  # the parent's OpenMP pool did not survive the fork either
            generate(offloader.model, session, new_tokens=4)  # completes: the steps are refused
            snapshot = session.snapshot()
            assert snapshot["dropped_steps"] == 4, snapshot["dropped_steps"]
            assert snapshot["steps"] == tokens_before  # the parent's figures, nothing new
            assert snapshot["dropped_spans"] > 0
            assert "tracing.forked_session" in stream.getvalue()
            with pytest.raises(RuntimeError, match="create a TracingSession in this process"):
                session.attach(offloader)
            assert session.flush(1) is False
            started = time.monotonic()
            assert session.shutdown(60) is False  # it dropped steps
            # Nothing to wait for in the child: far less than the budget, however loaded the host.
            assert time.monotonic() - started < 30

        # Locks held by other threads across the fork: the queue's (a child that queued a step
        # would hang on it) and the log stream's (the child logs that its session is orphaned).
        stream = io.StringIO()
        configure_logging("json", stream=stream)
        try:
            with session._worker._queue.mutex, structlog._output._get_lock_for_file(stream):
                code = run_in_fork(child)
        finally:
            configure_logging("console")
        assert code == 0

        # The parent goes on tracing as before, with nothing from the child.
        generate(offloader.model, session, new_tokens=2)
        assert session.shutdown(10)
        assert session.stats.steps == tokens_before + 2
        assert session.snapshot()["dropped_steps"] == 0
        offloader.detach()

    def test_a_session_made_after_the_fork_traces_normally(self, memory_exporter):
        model = tiny_model()

        def child():
            torch.set_num_threads(1)
            session = TracingSession([memory_exporter], policy=SamplingPolicy.full_detail())
            offloader = traced_generation(session, new_tokens=3)
            assert session.shutdown(10)
            assert session.stats.steps == 3
            assert {span.name for span in memory_exporter.get_finished_spans()} >= {"step", "layer.compute", "layer.transfer"}
            offloader.detach()

        assert model is not None  # the parent holds a model, as a pre-forking server would
        assert run_in_fork(child) == 0


def test_a_session_never_shut_down_is_flushed_at_exit(tmp_path):
    """Interpreter exit sends what is still queued (the telemetry thread rests between batches)."""
    trace_file = tmp_path / "spans.jsonl"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))!r})
        from tests.tracing.conftest import traced_generation
        from tracedoffload.tracing.exporters.jsonl import OtlpJsonLinesExporter
        from tracedoffload.tracing.sampling import SamplingPolicy
        from tracedoffload.tracing.session import TracingSession
        session = TracingSession([OtlpJsonLinesExporter({str(trace_file)!r})], policy=SamplingPolicy.full_detail(), batch_interval_s=10)
        traced_generation(session, new_tokens=3, flush=False)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    tokens = [span for span in read_otlp_jsonl(trace_file) if span.name == "step"]
    assert len(tokens) == 3


def test_at_exit_a_stuck_exporter_neither_holds_the_exit_nor_costs_another_session_its_spans(tmp_path):
    """Two sessions never shut down, one behind an exporter that never returns: the process still
    exits within the exit budget (plus start-up), and the other session's file is complete."""
    trace_file = tmp_path / "spans.jsonl"
    script = textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {str(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))!r})
        from opentelemetry.sdk.trace.export import SpanExporter
        from tests.tracing.conftest import traced_generation
        from tracedoffload.tracing.exporters.jsonl import OtlpJsonLinesExporter
        from tracedoffload.tracing.sampling import SamplingPolicy
        from tracedoffload.tracing.session import TracingSession

        class Stuck(SpanExporter):
            def export(self, spans):
                threading.Event().wait()

        policy = SamplingPolicy.full_detail()
        stuck = TracingSession([Stuck()], policy=policy, batch_interval_s=10)
        traced_generation(stuck, new_tokens=3, flush=False).detach()
        stuck.flush(0.5)  # the exporter is now inside its never-ending export
        healthy = TracingSession([OtlpJsonLinesExporter({str(trace_file)!r})], policy=policy, batch_interval_s=10)
        traced_generation(healthy, new_tokens=3, flush=False)
        print("generated", flush=True)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for line in process.stdout:  # structlog's default logger also prints here
        if line.strip() == "generated":
            break
    exit_began = time.monotonic()
    # Without the exit budget the stuck exporter would hold the exit forever; with it, the exit
    # takes the 5 s budget and the interpreter's own exit, which a loaded host stretches (8.3 s
    # seen once): a generous bound that still tells a bounded exit from a hang.
    assert process.wait(timeout=120) == 0
    assert time.monotonic() - exit_began < 5.0 + 40.0
    tokens = [span for span in read_otlp_jsonl(trace_file) if span.name == "step"]
    assert len(tokens) == 3
