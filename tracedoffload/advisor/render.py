"""The advice as text (a table and the recommendation in words) or as JSON-ready data."""

from __future__ import annotations

from typing import Any

from tracedoffload.advisor.candidates import Candidate, table_rows
from tracedoffload.advisor.measured import MeasuredRun
from tracedoffload.advisor.model import offloaded_compute_factor
from tracedoffload.advisor.recommend import Advice, MiB, describe, label


def run_flags(run: MeasuredRun, candidate: Candidate) -> list[str]:
    """The flags of `tracedoffload run` (or `serve`, with a batch size) that set this candidate."""
    choice = candidate.choice
    flags = ["--num-gpu-layers", str(choice.gpu_layers), "--residency", choice.residency, "--prefetch", str(choice.prefetch)]
    if len(run.batches) > 1 or choice.sequences > 1:
        flags += ["--max-batch-size", str(choice.sequences)]
    return flags


def shown_rows(run: MeasuredRun, advice: Advice) -> list[Candidate]:
    """The table's rows: the fitting candidates worth printing, the run's own and the recommendation."""
    fitting = [c for c in advice.candidates if advice.device_memory is None or c.peak_bytes <= advice.device_memory]
    extra = [advice.measured] + ([advice.recommended] if advice.recommended else [])
    return table_rows(run, fitting, extra)


def advice_text(path: str, run: MeasuredRun, advice: Advice) -> str:
    """The table and the recommendation, as `tracedoffload advise` prints them."""
    measured = advice.measured
    error = measured.ms_per_token / advice.measured_ms_per_token - 1
    batch = run.batch(measured.choice.sequences)
    lines = [
        f"advice from {path}: {run.device}, {run.num_layers} decoder layers, {batch.steps} decode steps measured at {label(run, measured.choice)}",
        f"measured {advice.measured_ms_per_token:.2f} ms/token; the model gives {measured.ms_per_token:.2f} for that configuration ({100 * error:+.1f} %)",
        _figures_line(run, measured),
        "",
        f"{'resident':>8}  {'residency':<11}{'prefetch':>8}{'seqs':>6}{'ms/token':>10}{'step ms':>9}{'peak MiB':>10}  note",
    ]
    for row in shown_rows(run, advice):
        notes = []
        if row.choice == measured.choice:
            notes.append("the run's own" + (" (does not fit)" if advice.device_memory is not None and row.peak_bytes > advice.device_memory else ""))
        if advice.recommended is not None and row.choice == advice.recommended.choice:
            notes.append("recommended")
        lines.append(
            f"{row.choice.gpu_layers:>8}  {row.choice.residency:<11}{row.choice.prefetch:>8}{row.choice.sequences:>6}"
            f"{row.ms_per_token:>10.2f}{row.time.step_ns / 1e6:>9.2f}{row.peak_bytes / MiB:>10.1f}  {', '.join(notes)}"
        )
    lines.append(f"({len(advice.candidates)} candidates weighed: every resident layer count, residency and prefetch depth; the table shows the best at each preset's count)")
    if advice.excluded:
        lines.append(f"excluded: {advice.excluded} candidates need more than --device-memory {advice.device_memory / MiB:,.1f} MiB")
    lines.append("")
    if advice.recommended is None:
        lines.append(f"no recommendation: {advice.reason}")
    else:
        lines.append(f"recommended: {describe(run, advice.recommended)}")
        lines.append(f"  why: {advice.reason}")
        lines.append(f"  how: {advice.mechanism}")
        lines.append(f"  flags: {' '.join(run_flags(run, advice.recommended))}")
    lines += [f"  caveat: {caveat}" for caveat in advice.caveats]
    lines.append("(a model of this run's measured figures: see the README's `advise` section for what it assumes and where it breaks)")
    return "\n".join(lines)


def _figures_line(run: MeasuredRun, measured: Candidate) -> str:
    batch = run.batch(measured.choice.sequences)
    compute = sorted(batch.compute_ns)[len(batch.compute_ns) // 2]
    rate = f"copies {run.transfer_bytes_per_ns:.3g} GB/s" if run.transfer_bytes_per_ns else "no copies"
    return (
        f"figures: {rate}, compute {compute / 1e6:.3f} ms per layer (the median layer), offloaded/resident compute "
        f"{offloaded_compute_factor(run, batch.sequences):.3f}, swap {run.swap_ns / 1e6:.3f} ms, other {batch.other_ns / 1e6:.2f} ms "
        f"and gap {batch.gap_ns / 1e6:.2f} ms per step"
    )


def advice_data(path: str, run: MeasuredRun, advice: Advice) -> dict[str, Any]:
    """The advice as JSON-ready data."""
    measured = advice.measured
    batch = run.batch(measured.choice.sequences)
    recommendation = None
    if advice.recommended is not None:
        recommendation = {**_row(run, advice, advice.recommended), "reason": advice.reason, "mechanism": advice.mechanism, "meets_target": advice.meets_target}
    return {
        "file": path,
        "device": run.device,
        "layers": run.num_layers,
        "copy_engine": run.copy_engine,
        "measured": {
            **_row(run, advice, measured),
            "decode_steps": batch.steps,
            "measured_ms_per_token": round(advice.measured_ms_per_token, 4),
        },
        "figures": {
            "transfer_gbps": round(run.transfer_bytes_per_ns, 4) if run.transfer_bytes_per_ns else None,
            "compute_ms_per_layer": [round(ns / 1e6, 4) for ns in batch.compute_ns],
            "offloaded_compute_factor": round(offloaded_compute_factor(run, batch.sequences), 4),
            "swap_ms": round(run.swap_ns / 1e6, 4),
            "other_ms": round(batch.other_ns / 1e6, 4),
            "gap_ms": round(batch.gap_ns / 1e6, 4),
            "batch_sizes": [b.sequences for b in run.batches],
        },
        "device_memory_bytes": advice.device_memory,
        "target_ms_per_token": advice.target_ms,
        "candidates_weighed": len(advice.candidates),
        "excluded": advice.excluded,
        "candidates": [_row(run, advice, row) for row in shown_rows(run, advice)],
        "recommendation": recommendation,
        "caveats": advice.caveats,
    }


def _row(run: MeasuredRun, advice: Advice, candidate: Candidate) -> dict[str, Any]:
    choice, time, memory = candidate.choice, candidate.time, candidate.memory
    return {
        "gpu_layers": choice.gpu_layers,
        "residency": choice.residency,
        "prefetch": choice.prefetch,
        "sequences": choice.sequences,
        "ms_per_token": round(candidate.ms_per_token, 4),
        "step_ms": round(time.step_ns / 1e6, 4),
        "time_ms": {"compute": round(time.compute_ns / 1e6, 4), "offload": round(time.offload_ns / 1e6, 4), "other": round(time.other_ns / 1e6, 4), "gap": round(time.gap_ns / 1e6, 4)},
        "peak_device_bytes": candidate.peak_bytes,
        "memory_bytes": {
            "base": memory.base_bytes,
            "resident_layers": memory.resident_layer_bytes,
            "slot_pool": memory.slot_pool_bytes,
            "kv_cache": memory.kv_cache_bytes,
            "activations": memory.activation_bytes,
        },
        "fits": advice.device_memory is None or candidate.peak_bytes <= advice.device_memory,
        "run_flags": run_flags(run, candidate),
    }
