"""Text renderings of the statistics: the end-of-run table, the periodic profiling summary, and
the slowest-step list. Pure functions of a stats snapshot (see stats.py); they print nothing."""

from __future__ import annotations

from typing import Any


def stats_table(stats: dict[str, Any]) -> str:
    """The end-of-run statistics table, in the terms of the device it ran on: on a CPU device the
    "transfer" is a memcpy within host memory that cannot overlap compute (one set of cores does
    both), so the rows about overlap and device memory saved, which cannot apply, are left out."""
    if not stats.get("steps"):
        return f"offload statistics: none ({stats.get('reason', 'no steps traced')})"
    breakdown = stats["time_breakdown"]
    latency = stats["step_latency_ms"]
    per_token = stats["per_generated_token"]
    on_cpu = str(stats.get("device") or "").startswith("cpu")
    copy = "host->slot copy ms (CPU memcpy)" if on_cpu else "cpu->gpu transfer ms"
    rows = [
        ("device", str(stats.get("device") or "not recorded")),
        ("offloading", "enabled" if stats["enabled"] else "disabled (every layer resident)"),
        ("gpu / cpu layers" if not on_cpu else "resident / offloaded", f"{stats['gpu_layers']} / {stats['cpu_layers']}"),
        ("generations", str(stats.get("generations", 1))),
        ("steps (forwards)", f"{stats['steps']}  ({_phases(stats['steps_by_phase'])})"),
        ("generated tokens", f"{stats['generated_tokens']}  ({_per_token(per_token)})"),
        *_speculation_rows(stats),
        ("step latency ms", f"p50 {latency['p50']:.2f}  p90 {latency['p90']:.2f}  p99 {latency['p99']:.2f}  max {latency['max']:.2f}"),
        ("pure computation ms", f"{breakdown['pure_computation_ms']:.2f}"),
        (copy, f"{breakdown['cpu_to_gpu_transfer_ms']:.2f}  ({stats['transfer_gbps']:.2f} GB/s, avg {stats['avg_layer_transfer_ms']:.3f} ms/layer)"),
        ("release ms" if on_cpu else "gpu->cpu release ms", f"{breakdown['gpu_to_cpu_release_ms']:.2f}  (pointer swap, no copy back)"),
        ("transfer overhead", f"{stats['transfer_overhead_ms']:.2f} ms = {stats['overhead_percentage']:.1f}% of transfer+compute"),
        ("prefetched transfers", f"{100 * stats['prefetched_share']:.1f}% issued ahead of need"),
    ]
    if not on_cpu:
        rows += [
            ("overlap efficiency", f"{100 * stats['overlap_efficiency']:.1f}% of copy time hidden behind compute"),
            ("compute waited for copies", f"{stats['compute_wait_ms']:.2f} ms"),
            ("theoretical async savings", f"{stats['theoretical_async_savings_ms']:.2f} ms"),
            ("vram saved", f"{stats['vram_saved_gb']:.4f} GB  (pinned host {stats['pinned_bytes'] / 2**20:.1f} MiB)"),
        ]
    rows += [
        ("steps with layer detail", str(stats["layer_detail_steps"])),
        ("dropped spans", "not known from a trace file" if stats["dropped_spans"] is None else str(stats["dropped_spans"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(["offload statistics (from spans)"] + [f"  {name:<{width}}  {value}" for name, value in rows])


def slowest_steps(stats: dict[str, Any], limit: int = 10, *, exported: bool = True) -> str:
    """The slowest steps with the trace ids to open in Jaeger or Tempo.

    Args:
        exported: whether the steps' traces were exported; when not (a run at --trace-level
            generation), the ids are still listed, but not as something to open.
    """
    where = "open the trace id in Jaeger/Tempo" if exported else "their traces were not exported at this --trace-level"
    lines = [f"slowest steps ({where})"]
    for step in stats.get("slowest_steps", [])[:limit]:
        served = ", ".join(step["generation_ids"][:3]) + (f" +{len(step['generation_ids']) - 3}" if len(step["generation_ids"]) > 3 else "")
        lines.append(f"  {step['ms']:9.3f} ms  step {step['step_index']:>5}  {step['phase']:<13}  x{step['sequences']:<3}  trace {step['trace_id']}  generation {served}")
    return "\n".join(lines)


def _speculation_rows(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """Speculative decoding's rows, when it drafted anything."""
    drafted = stats.get("drafted_tokens")
    if not drafted:
        return []
    rate = stats.get("acceptance_rate")
    rows = [("drafted tokens", f"{drafted}, {stats['accepted_tokens']} kept ({100 * rate:.1f}% acceptance)" if rate is not None else str(drafted))]
    if stats.get("draft_forwards"):
        rows.append(("draft forwards", f"{stats['draft_forwards']}  ({stats['draft_ms']:.2f} ms, inside the steps' time)"))
    return rows


def _phases(by_phase: dict[str, int]) -> str:
    return ", ".join(f"{count} {phase}" for phase, count in by_phase.items())


def _per_token(per_token: dict[str, Any]) -> str:
    if per_token.get("steps") is None:
        return "no new tokens"
    return f"per token: {per_token['steps']:.2f} forwards, {per_token['transfer_bytes'] / 2**20:.2f} MiB copied"


def profile_summary(stats: dict[str, Any], step_count: int) -> str:
    """The periodic profiling summary (per-layer compute, transfers, theoretical savings)."""
    lines = [
        f"profiling summary - step {step_count}",
        "  per layer (* = offloaded): compute is the average ms per step; transfer and waited are totals so far",
        f"    {'layer':>9}  {'compute avg ms':>14}  {'transfer total ms':>17}  {'waited total ms':>15}",
    ]
    for index, row in stats.get("per_layer", {}).items():
        mark = "*" if row["offloaded"] else " "
        lines.append(f"    {index:>8}{mark}  {row['avg_compute_ms']:14.3f}  {row['transfer_ms']:17.2f}  {row['wait_ms']:15.2f}")
    breakdown = stats.get("time_breakdown", {})
    total = sum(breakdown.values()) or 1.0
    lines.append(
        "  totals: "
        + "  ".join(f"{name.replace('_ms', '')} {value:.1f} ms ({100 * value / total:.1f}%)" for name, value in breakdown.items())
    )
    if not str(stats.get("device") or "").startswith("cpu"):  # a CPU device cannot overlap copies
        lines.append(f"  theoretical async savings: {stats.get('theoretical_async_savings_ms', 0.0):.2f} ms")
    return "\n".join(lines)
