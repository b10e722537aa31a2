"""`tracedoffload run`: one offloaded generation with a summary of what moved and how long it took.

    tracedoffload run --prompt "Why is the sky blue?"
    tracedoffload run --preset aggressive --max-new-tokens 32
    tracedoffload run --num-gpu-layers 14 --prefetch 2 --json
    tracedoffload run --no-offload            # every layer resident, for comparison
    tracedoffload run --model model.gguf      # any GGUF transformers loads; converted once, cached
    tracedoffload run --model random          # the random 28-layer model: no file, no load time
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from tracedoffload._checks import check_int
from tracedoffload._exceptions import ConfigError
from tracedoffload.cli import EXIT_INTERRUPTED, model_flags, telemetry_flags
from tracedoffload.cli.progress import end_progress_line
from tracedoffload.decoding import Decoding
from tracedoffload.speculation import MAX_DRAFT_TOKENS

# torch, transformers and the OpenTelemetry SDK are imported inside `run`, not here: --help and
# a bad flag answer before they would have finished importing (seconds).

DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `run` subcommand."""
    parser = subparsers.add_parser(
        "run",
        help="generate once with some decoder layers offloaded and print a summary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model_flags.add_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the most tokens to generate; the model's end-of-turn token stops it sooner (default 64)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the prompt text (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--system", metavar="TEXT", help="a system message before the prompt (models with a chat template)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the tokenizer's chat template")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--html",
        type=Path,
        metavar="OUT",
        help="also write an HTML report of the run's spans to OUT (charts, statistics; needs plotly: pip install 'tracedoffload[report]')",
    )
    sampling = parser.add_argument_group("sampling (greedy unless --temperature is above 0)")
    sampling.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (default 0: greedy)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the most likely tokens up to this probability (default 1: off)")
    sampling.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: off)")
    sampling.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this share of the most likely one's probability (default 0: off)")
    sampling.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 discourages tokens already in the prompt or answer (default 1: off; greedy too)")
    sampling.add_argument("--sampling-seed", type=int, default=None, help="seed of the sampling: the same seed, the same answer")
    speculation = parser.add_argument_group("speculative decoding (the same greedy output, in fewer offloaded forwards when drafts are kept)")
    drafts = speculation.add_mutually_exclusive_group()
    drafts.add_argument("--prompt-lookup", type=int, metavar="N", help="draft up to N tokens per step from n-gram matches in the prompt (no draft model)")
    drafts.add_argument("--draft-model", metavar="PATH", help="a small model with the same vocabulary (a .gguf or a directory), kept resident, that drafts tokens")
    speculation.add_argument("--draft-tokens", type=int, default=5, metavar="N", help="tokens the draft model proposes per step (default 5)")
    speculation.add_argument("--adaptive-draft", action="store_true", help="adapt the draft length: one more after a step that kept all, one fewer otherwise")
    telemetry_flags.add_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load, offload, generate once, detach; print the summary, then send the telemetry.

    Ctrl-C stops the generation at the next step: the summary of what ran is printed, the trace
    flushed, and the exit status is 130.

    Raises:
        TracedOffloadError: bad flags (ConfigError names the field), a missing device or model.
    """
    from tracedoffload.logs import configure_logging

    if args.max_new_tokens < 1:
        raise ConfigError("max_new_tokens", args.max_new_tokens, "an integer >= 1")
    # Log lines go to stderr so that stdout carries only the summary (parseable with --json).
    configure_logging(args.log_format, args.log_level, stream=_CurrentStderr())
    # Validate everything that needs no model before loading one: bad flags fail fast, and
    # before torch and transformers are imported.
    settings = telemetry_flags.check_arguments(args)
    config = model_flags.offload_config(args)
    if args.html is not None:
        _check_html(args, settings, config)
    decoding = Decoding(args.temperature, args.top_p, args.top_k, args.min_p, args.repetition_penalty, args.sampling_seed)
    check_int("draft_tokens", args.draft_tokens, 1, MAX_DRAFT_TOKENS)
    if args.prompt_lookup is not None:
        check_int("prompt_lookup", args.prompt_lookup, 1, MAX_DRAFT_TOKENS)

    from tracedoffload.cli.summary import format_summary, placement_figures, run_summary
    from tracedoffload.generation import FINISH_INTERRUPTED, encode_prompt, generate_once
    from tracedoffload.layers import find_decoder_layers
    from tracedoffload.models import load_model
    from tracedoffload.offloader import offload, resolve_device
    from tracedoffload.planner import kv_bytes_per_token

    config, dtype = model_flags.with_dtype(config, args)
    device = resolve_device(args.device)
    _notify(f"loading {args.model or 'the default model'}")
    loaded = load_model(args.model, dtype, seed=args.seed, notify=_notify)
    model, tokenizer, name = loaded.model, loaded.tokenizer, loaded.name
    prompting: dict[str, Any] = {"system": args.system, "raw": args.raw, "interruptible": True, "speculation": _speculation(args, model, dtype, device), "decoding": decoding}
    encode_prompt(tokenizer, args.prompt, system=args.system, raw=args.raw)  # a prompt error stops the run before the offloader attaches
    if config is None:
        model.to(device)
        generation = generate_once(model, tokenizer, args.prompt, args.max_new_tokens, **prompting)
        summary = run_summary(name, placement_figures(None, len(find_decoder_layers(model)[1]), device), generation, None, args.max_new_tokens)
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary), flush=True)
        return EXIT_INTERRUPTED if generation.finish_reason == FINISH_INTERRUPTED else 0
    from tracedoffload.cli import _telemetry

    offloader = offload(model, config)
    collector = None
    if args.html is not None:
        from tracedoffload.report.span_collector import ReportSpanCollector

        collector = ReportSpanCollector()
    telemetry = _telemetry.start(args, settings, offloader, name, kv_bytes_per_token(model.config, model_flags.weights_dtype(model)), collector)
    try:
        placement = placement_figures(offloader, len(offloader.layers), offloader.device)
        generation = generate_once(model, tokenizer, args.prompt, args.max_new_tokens, telemetry.session, name, **prompting)
        telemetry.finish_statistics()
    except BaseException:
        telemetry.close()  # what was traced before the failure is still sent, within the budget
        raise
    finally:
        offloader.detach()
    summary = run_summary(name, placement, generation, telemetry.stats, args.max_new_tokens)
    summary["trace_file"] = str(settings.trace_file) if settings.trace_file and telemetry.session else None
    summary["perfetto_file"] = str(settings.perfetto) if settings.perfetto and telemetry.session else None
    summary["step_traces_exported"] = settings.sampling.level in ("token", "layer") and telemetry.exports_spans
    summary["leak_alerts"] = [dataclasses.asdict(alert) for alert in telemetry.monitor.alerts] if telemetry.monitor else []
    # The summary first: a collector that is down must not hold what the run measured.
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary), flush=True)
    telemetry.flush_exports()
    try:
        if collector is not None:
            _write_html(args.html, collector, name)
    finally:
        telemetry.linger_and_close(args.metrics_linger)  # the metrics endpoint closed even when the page is not written
    return EXIT_INTERRUPTED if generation.finish_reason == FINISH_INTERRUPTED else 0


def _check_html(args: argparse.Namespace, settings: Any, config: Any) -> None:
    """--html is checked with the other flags, before any model loads: its path, that the run
    will have step spans to draw, and that plotly is installed."""
    from tracedoffload.report.dependency import require_plotly
    from tracedoffload.report.output import FIELD, check_html_path

    check_html_path(args.html)
    if config is None:
        raise ConfigError(FIELD, str(args.html), "an offloaded run: with --no-offload nothing is traced")
    if settings.sampling.level not in ("token", "layer"):
        raise ConfigError(FIELD, str(args.html), f"a run traced at --trace-level token or layer (the report is drawn from the step spans), not {settings.sampling.level}")
    require_plotly()


def _write_html(path: Path, collector: Any, model_name: str) -> None:
    """The report of the spans the run exported, once they were all handed over (after the flush)."""
    from tracedoffload.report.page import write_report

    size = write_report(path, collector.digest_now(), f"run of {model_name}")
    _notify(f"wrote the HTML report {path} ({size / 1e6:.1f} MB)")


def _speculation(args: argparse.Namespace, model: Any, dtype: Any, device: Any) -> Any:
    """The speculation the flags ask for (a draft model loaded and kept resident), or None."""
    from tracedoffload.speculation import Speculation

    schedule = "heuristic" if args.adaptive_draft else "constant"
    if args.prompt_lookup is not None:
        return Speculation(prompt_lookup_tokens=args.prompt_lookup)
    if args.draft_model is None:
        return None
    from tracedoffload.models import load_model
    from tracedoffload.speculation import check_draft

    _notify(f"loading the draft model {args.draft_model}")
    draft = load_model(args.draft_model, dtype, notify=_notify).model.to(device)
    check_draft(draft, model)
    return Speculation(draft_model=draft, draft_tokens=args.draft_tokens, schedule=schedule)


def _notify(message: str) -> None:
    end_progress_line()
    print(f"tracedoffload: {message}", file=sys.stderr, flush=True)


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time (a test harness swaps it per test)."""

    def write(self, text: str) -> int:
        end_progress_line()  # a log line never starts after the progress bar
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
