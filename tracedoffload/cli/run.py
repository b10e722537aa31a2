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
from tracedoffload.cli import EXIT_INTERRUPTED, model_flags, prompt_flags, telemetry_flags
from tracedoffload.cli.progress import end_progress_line, notify
from tracedoffload.answer import MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, check_stop, check_top_logprobs
from tracedoffload.decoding import Decoding
from tracedoffload.speculation import MAX_DRAFT_TOKENS

# torch, transformers and the OpenTelemetry SDK are imported inside `run`, not here: --help and
# a bad flag answer before they would have finished importing (seconds).

MAX_SAMPLES = 8  # as many answers as `serve` gives one request (`n`)


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
    prompt_flags.add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--verify", action="store_true", help="compare with every layer resident instead, greedy: exit 1 where they diverge (as `tracedoffload verify`)")
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
    sampling.add_argument("--sampling-seed", type=int, default=None, help="seed of the sampling: the same seed, the same answer(s)")
    sampling.add_argument("--presence-penalty", type=float, default=0.0, help="-2 to 2: minus this for each token already in the answer (default 0: off; greedy too)")
    sampling.add_argument("--frequency-penalty", type=float, default=0.0, help="-2 to 2: minus this times each token's count in the answer (default 0: off; greedy too)")
    sampling.add_argument("--num-samples", type=int, default=1, metavar="N", help=f"N answers to the prompt (1 to {MAX_SAMPLES}), sampled together in one batch (default 1)")
    answers = parser.add_argument_group("answers")
    answers.add_argument("--stop", action="append", default=[], metavar="TEXT", help=f"end the answer before this text (repeat, up to {MAX_STOP_STRINGS})")
    answers.add_argument("--logprobs", type=int, metavar="K", help=f"print each token's log-probability and the K most likely tokens' (0 to {MAX_TOP_LOGPROBS})")
    speculation = parser.add_argument_group("speculative decoding (the same greedy output, in fewer offloaded forwards when drafts are kept)")
    drafts = speculation.add_mutually_exclusive_group()
    drafts.add_argument("--prompt-lookup", type=int, metavar="N", help="draft up to N tokens per step from n-gram matches in the prompt (no draft model)")
    drafts.add_argument("--draft-model", metavar="PATH", help="a small model with the same vocabulary (a .gguf or a directory), kept resident, that drafts tokens")
    drafts.add_argument(
        "--early-exit", type=int, metavar="K", help="the model drafts with its first K layers, kept resident (--residency first); pays on models trained to exit early"
    )
    speculation.add_argument("--draft-tokens", type=int, default=5, metavar="N", help="tokens the draft model or the early exit proposes per step (default 5)")
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
    if args.verify:
        return _verify(args)
    # Log lines go to stderr so that stdout carries only the summary (parseable with --json).
    configure_logging(args.log_format, args.log_level, stream=_CurrentStderr())
    # Validate everything that needs no model before loading one: bad flags fail fast, and
    # before torch and transformers are imported.
    settings = telemetry_flags.check_arguments(args)
    config = model_flags.offload_config(args)
    if args.html is not None:
        _check_html(args, settings, config)
    decoding = Decoding(args.temperature, args.top_p, args.top_k, args.min_p, args.repetition_penalty, args.sampling_seed, args.presence_penalty, args.frequency_penalty)
    stop, logprobs = check_stop(args.stop), check_top_logprobs(args.logprobs)
    _check_samples(args, decoding)
    check_int("draft_tokens", args.draft_tokens, 1, MAX_DRAFT_TOKENS)
    if args.prompt_lookup is not None:
        check_int("prompt_lookup", args.prompt_lookup, 1, MAX_DRAFT_TOKENS)
    if args.early_exit is not None:
        config = _early_exit_residency(config, args.early_exit, args.residency)

    from tracedoffload.cli.summary import format_summary, placement_figures, run_summary
    from tracedoffload.generation import FINISH_INTERRUPTED, encode_prompt, generate_batched, generate_once
    from tracedoffload.layers import find_decoder_layers
    from tracedoffload.models import load_model
    from tracedoffload.offloader import offload, resolve_device
    from tracedoffload.planner import kv_bytes_per_token

    config, dtype = model_flags.with_dtype(config, args)
    device = resolve_device(args.device)
    notify(f"loading {args.model or 'the default model'}")
    loaded = load_model(args.model, dtype, seed=args.seed, notify=notify)
    model, tokenizer, name = loaded.model, loaded.tokenizer, loaded.name
    check_stop(stop, tokenizer)  # before the offloader attaches
    prompting: dict[str, Any] = {"system": args.system, "raw": args.raw, "interruptible": True, "decoding": decoding, "stop": stop, "logprobs": logprobs}
    if args.num_samples == 1:
        prompting["speculation"] = _speculation(args, model, dtype, device)
    encode_prompt(tokenizer, args.prompt, system=args.system, raw=args.raw)  # a prompt error stops the run before the offloader attaches

    def generate(*tracing: Any) -> list[Any]:
        if args.num_samples == 1:
            return [generate_once(model, tokenizer, args.prompt, args.max_new_tokens, *tracing, **prompting)]
        return generate_batched(model, tokenizer, [args.prompt], args.max_new_tokens, *tracing, samples=args.num_samples, **prompting)

    if config is None:
        model.to(device)
        generations = generate()
        summary = run_summary(name, placement_figures(None, len(find_decoder_layers(model)[1]), device), generations, None, args.max_new_tokens)
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary), flush=True)
        return EXIT_INTERRUPTED if generations[0].finish_reason == FINISH_INTERRUPTED else 0
    from tracedoffload.cli import _telemetry

    offloader = offload(model, config)
    collector = None
    if args.html is not None:
        from tracedoffload.report.span_collector import ReportSpanCollector

        collector = ReportSpanCollector()
    telemetry = _telemetry.start(args, settings, offloader, name, kv_bytes_per_token(model.config, model_flags.weights_dtype(model)), collector)
    try:
        placement = placement_figures(offloader, len(offloader.layers), offloader.device)
        generations = generate(telemetry.session, name)
        telemetry.finish_statistics()
    except BaseException:
        telemetry.close()  # what was traced before the failure is still sent, within the budget
        raise
    finally:
        offloader.detach()
    summary = run_summary(name, placement, generations, telemetry.stats, args.max_new_tokens)
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
    return EXIT_INTERRUPTED if generations[0].finish_reason == FINISH_INTERRUPTED else 0


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
    notify(f"wrote the HTML report {path} ({size / 1e6:.1f} MB)")


def _speculation(args: argparse.Namespace, model: Any, dtype: Any, device: Any) -> Any:
    """The speculation the flags ask for (a draft model loaded and kept resident), or None."""
    from tracedoffload.speculation import Speculation

    schedule = "heuristic" if args.adaptive_draft else "constant"
    if args.prompt_lookup is not None:
        return Speculation(prompt_lookup_tokens=args.prompt_lookup)
    if args.early_exit is not None:
        return Speculation(early_exit_layers=args.early_exit, draft_tokens=args.draft_tokens, schedule=schedule)
    if args.draft_model is None:
        return None
    from tracedoffload.models import load_model
    from tracedoffload.speculation import check_draft

    notify(f"loading the draft model {args.draft_model}")
    draft = load_model(args.draft_model, dtype, notify=notify).model.to(device)
    check_draft(draft, model)
    return Speculation(draft_model=draft, draft_tokens=args.draft_tokens, schedule=schedule)


def _verify(args: argparse.Namespace) -> int:
    """`run --verify`: `tracedoffload verify` with run's model, offload and prompt flags."""
    from tracedoffload.cli.verify import verify
    from tracedoffload.verify import DEFAULT_ATOL

    generating = {
        "temperature": args.temperature > 0, "num_samples": args.num_samples != 1, "prompt_lookup": args.prompt_lookup is not None,
        "draft_model": args.draft_model is not None, "early_exit": args.early_exit is not None, "stop": bool(args.stop), "logprobs": args.logprobs is not None,
        "presence_penalty": args.presence_penalty != 0, "frequency_penalty": args.frequency_penalty != 0, "repetition_penalty": args.repetition_penalty != 1, "html": args.html is not None,
    }
    field = next((name for name, given in generating.items() if given), None)
    if field is not None:
        raise ConfigError(field, getattr(args, field), "not with --verify, which compares greedy answers")
    args.atol, args.corrupt_layer = DEFAULT_ATOL, None
    return verify(args)


def _check_samples(args: argparse.Namespace, decoding: Decoding) -> None:
    check_int("num_samples", args.num_samples, 1, MAX_SAMPLES)
    if args.num_samples == 1:
        return
    if not decoding.sampled:
        raise ConfigError("num_samples", args.num_samples, "1 unless sampling (greedy answers would all be the same): give a temperature above 0 too")
    speculating = next((flag for flag, value in (("--prompt-lookup", args.prompt_lookup), ("--draft-model", args.draft_model), ("--early-exit", args.early_exit)) if value is not None), None)
    if speculating:
        raise ConfigError("num_samples", args.num_samples, f"1 with {speculating} (transformers speculates at batch 1 only)")


def _early_exit_residency(config: Any, layers: int, residency_flag: str | None) -> Any:
    """The early exit's draft runs the first layers: they are the resident ones (a draft through
    offloaded layers would stream them once more per drafted token)."""
    check_int("early_exit", layers, 1)
    if config is None:  # --no-offload: every layer is resident already
        return None
    if config.residency != "first":
        if residency_flag is not None:
            raise ConfigError("residency", config.residency, "first, with --early-exit (the draft runs the first layers, which must be resident)")
        config = dataclasses.replace(config, residency="first")
    return config


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time (a test harness swaps it per test)."""

    def write(self, text: str) -> int:
        end_progress_line()  # a log line never starts after the progress bar
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
