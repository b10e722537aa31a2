"""The end-of-run summary of `tracedoffload run`: placement, generation figures and the offload
statistics (aggregated from the run's spans by the tracing core), and their text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tracedoffload.generation import FINISH_INTERRUPTED, FINISH_STOP
from tracedoffload.tracing.summary import slowest_steps, stats_table


def placement_figures(offloader: Any, num_layers: int, device: Any) -> dict[str, Any]:
    """Where the layers are; read before `detach()`, which frees the slots and host buffers.

    Args:
        offloader: the attached `Offloader`, or None when every layer is resident.
        num_layers: the model's decoder layer count.
        device: the compute device.
    """
    return {
        "device": str(device),
        "offload": offloader is not None,
        "resident_layers": list(offloader.resident_indices) if offloader else list(range(num_layers)),
        "offloaded_layers": list(offloader.offloaded_indices) if offloader else [],
        "pinned_bytes": offloader.pinned_bytes if offloader else 0,
        "device_pool_bytes": offloader.device_pool_bytes if offloader else 0,
    }


def run_summary(model_name: str, placement: dict[str, Any], generations: Sequence[Any], stats: dict[str, Any] | None, max_new_tokens: int) -> dict[str, Any]:
    """The figures `tracedoffload run` prints, as a JSON-ready dict: the first (or only)
    answer's at the top, and every answer under `samples` when there are several.

    Args:
        model_name: the model's display name.
        placement: from `placement_figures`.
        generations: `tracedoffload.generation.Generation`s, one per sample (token counts,
            seconds, text, why it stopped, log-probabilities when asked for).
        stats: the tracing session's statistics, or None when the run was not traced.
        max_new_tokens: the run's maximum, for the stop reason's text.
    """
    first, seconds = generations[0], generations[0].seconds
    tokens = sum(g.generated_tokens for g in generations)
    summary = {
        "model": model_name,
        **placement,
        "prompt_tokens": first.prompt_tokens,
        "generated_tokens": tokens,
        "wall_s": seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "ms_per_token": 1e3 * seconds / tokens if tokens else 0.0,
        "stats": stats,
        **_answer(first, max_new_tokens),
    }
    if len(generations) > 1:
        summary["samples"] = [{"generated_tokens": g.generated_tokens, **_answer(g, max_new_tokens)} for g in generations]
    return summary


def _answer(generation: Any, max_new_tokens: int) -> dict[str, Any]:
    answer = {"finish_reason": generation.finish_reason, "stop_reason": _stop_reason(generation, max_new_tokens), "output_text": generation.text}
    if generation.logprobs is not None:
        # OpenAI's chat shape: the chosen token's log-probability and the alternatives'.
        answer["logprobs"] = [
            {"token": entry.token, "logprob": entry.logprob, "top_logprobs": [{"token": token, "logprob": value} for token, value in entry.top]}
            for entry in generation.logprobs
        ]
    return answer


def format_summary(summary: dict[str, Any]) -> str:
    """A `run_summary` as aligned text lines, the output text last."""
    rows = [
        ("model", summary["model"]),
        ("device", summary["device"]),
        ("offloading", "enabled" if summary["offload"] else "disabled (every layer resident)"),
        ("resident layers", _layers(summary["resident_layers"])),
        ("offloaded layers", _layers(summary["offloaded_layers"])),
        ("pinned host bytes", f"{summary['pinned_bytes']:,}"),
        ("device slot pool bytes", f"{summary['device_pool_bytes']:,}"),
        ("prompt tokens", str(summary["prompt_tokens"])),
        ("generated tokens", str(summary["generated_tokens"])),
        ("stopped", summary["stop_reason"]),
        ("wall time", f"{summary['wall_s']:.3f} s"),
        ("throughput", f"{summary['tokens_per_s']:.2f} tokens/s, {summary['ms_per_token']:.2f} ms/token"),
    ]
    for key, label in (("trace_file", "trace file"), ("perfetto_file", "perfetto trace")):
        if summary.get(key):
            rows.append((label, summary[key]))
    for alert in summary.get("leak_alerts") or []:
        rows.append(("LEAK SUSPECTED", f"{alert['source']}: ~{alert['bytes_per_step'] / 2**20:.2f} MiB/step, detected at step {alert['step_index']}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    stats = summary.get("stats")
    if stats is not None:
        lines += ["", stats_table(stats), slowest_steps(stats, 5, exported=summary.get("step_traces_exported", True))]
    elif summary["offload"]:
        lines += ["", "offload statistics: none (tracing was off: --trace-level off)"]
    answers = summary.get("samples") or [summary]
    for number, answer in enumerate(answers, 1):
        heading = f"output (sample {number} of {len(answers)}, {answer['generated_tokens']} tokens, stopped {answer['stop_reason']}):" if len(answers) > 1 else "output:"
        lines += [heading, _printable(answer["output_text"])]
        if "logprobs" in answer:
            lines += ["log-probabilities (token, its log-probability, the most likely tokens):", *map(_logprob_line, answer["logprobs"])]
    return "\n".join(lines)


def _logprob_line(entry: dict[str, Any]) -> str:
    alternatives = ", ".join(f"{_printable(repr(a['token']))} {a['logprob']:.4f}" for a in entry["top_logprobs"])
    return f"  {_printable(repr(entry['token'])):<16} {entry['logprob']:>9.4f}  {alternatives}"


def _stop_reason(generation: Any, max_new_tokens: int) -> str:
    if generation.stop_string is not None:
        return f"at the stop string {generation.stop_string!r}"
    if generation.finish_reason == FINISH_STOP:
        return f"at the end-of-turn token {generation.stop_token!r}"
    if generation.finish_reason == FINISH_INTERRUPTED:
        return "interrupted (Ctrl-C), after the step in progress"
    return f"at the maximum, --max-new-tokens {max_new_tokens}"


def _layers(indices: list[int]) -> str:
    return f"{len(indices)} {indices}" if indices else "0"


def _printable(text: str) -> str:
    # A random-weight model emits arbitrary bytes; escape control characters (an ESC byte would
    # drive the terminal) but keep line breaks and any printable script.
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode() for c in text)
