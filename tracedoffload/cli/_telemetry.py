"""The telemetry of one `tracedoffload run`: the library's `Telemetry` (tracedoffload/telemetry.py)
as the checked flags set it (`telemetry_flags.py`), plus what only a terminal run has: the
progress bar, the periodic profiling summary, and keeping the metrics endpoint up after the run."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from tracedoffload.cli.progress import ProgressBar, end_progress_line
from tracedoffload.logs import get_logger
from tracedoffload.telemetry import Telemetry, TelemetrySettings
from tracedoffload.tracing.summary import profile_summary

log = get_logger("tracedoffload.cli")


class RunTelemetry(Telemetry):
    """`Telemetry` with the run's progress bar, profiling summaries and metrics linger."""

    progress: ProgressBar | None = None

    def finish_statistics(self, timeout_s: float = 30.0) -> dict[str, Any] | None:
        stats = super().finish_statistics(timeout_s)
        if self.progress is not None:
            self.progress.close()
        return stats

    def linger_and_close(self, linger_s: float) -> None:
        """Keep serving the metrics for a final scrape, then close everything."""
        if self.metrics_port is not None and linger_s > 0:
            log.info("metrics.linger", seconds=linger_s, port=self.metrics_port)
            time.sleep(linger_s)
        self.close()


def start(
    args: argparse.Namespace, settings: TelemetrySettings, offloader: Any, model_name: str, kv_bytes_per_token: int, report_collector: Any = None
) -> RunTelemetry:
    """Attach tracing, memory monitoring, metrics and fault injection to `offloader` as the
    settings say, with the progress bar and profiling summaries the flags ask for, and
    `report_collector` (`--html`) receiving every exported span."""
    telemetry = RunTelemetry(settings, offloader, model_name, kv_bytes_per_token, local_exporters=[report_collector] if report_collector else [])
    telemetry.start()
    session = telemetry.session
    if session is None:
        return telemetry
    if args.progress or (args.progress is None and sys.stderr.isatty()):
        telemetry.progress = ProgressBar(args.max_new_tokens)
        session.add_step_listener(telemetry.progress)
    if args.profile_every:
        every = args.profile_every
        session.add_step_listener(lambda timing, stats: _maybe_profile(stats, every))
    return telemetry


def _maybe_profile(stats: Any, every: int) -> None:
    if stats.steps and stats.steps % every == 0:
        end_progress_line()
        print(profile_summary(stats.snapshot(), stats.steps), file=sys.stderr, flush=True)
