"""Offloading statistics aggregated from spans: live (a span processor) or from an exported file.

Everything comes from the `step` spans (one per forward pass): their sums and per-layer arrays
are computed from the same resolved times as the step's layer spans, so the numbers are complete
when layer spans are sampled out of an export, and a file gives the same numbers as the live run.
Layer spans are for drilling into one step in a tracing UI; counting them again here would double
count. Nothing here is measured or estimated on its own: every figure is a sum, ratio or
percentile of span data.

Figures are kept per forward (`steps`, `step_latency_ms`) and per generated token
(`per_generated_token`): with a batch, one forward moves the offloaded weights once for every
sequence it serves, and these two differ by the batch size. The schema keeps the seeds' fields
(`enabled` ... `vram_saved_gb`) and adds latency percentiles, the per-layer breakdown and
measured overlap.
"""

from __future__ import annotations

import collections
import heapq
import operator
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from tracedoffload import names
from tracedoffload.logs import get_logger
from tracedoffload.tracing.spanview import SpanView

_STEP_SUMS = (
    names.STEP_COMPUTE_NS,
    names.STEP_TRANSFER_NS,
    names.STEP_RELEASE_NS,
    names.STEP_WAIT_NS,
    names.STEP_OVERLAP_NS,
    names.STEP_TRANSFER_BYTES,
    names.STEP_TRANSFERS,
    names.STEP_PREFETCHED,
    names.STEP_TOKENS,
    names.STEP_GENERATED_TOKENS,
    names.STEP_DRAFTED_TOKENS,
    names.STEP_ACCEPTED_TOKENS,
    names.STEP_DRAFT_NS,
    names.STEP_DRAFT_FORWARDS,
)
_LAYER_FIELDS = {
    names.STEP_LAYERS_COMPUTE_NS: "compute_ns",
    names.STEP_LAYERS_TRANSFER_NS: "transfer_ns",
    names.STEP_LAYERS_RELEASE_NS: "release_ns",
    names.STEP_LAYERS_WAIT_NS: "wait_ns",
    names.STEP_LAYERS_OVERLAP_NS: "overlap_ns",
    names.STEP_LAYERS_TRANSFER_BYTES: "bytes",
}
PERCENTILES = (50, 90, 95, 99)
SLOWEST_KEPT = 10
log = get_logger("tracedoffload.tracing")


class OffloadStats:
    """Accumulates spans; `snapshot()` gives the metrics dict. Thread-safe."""

    def __init__(self, max_step_latencies: int = 100_000, slowest_kept: int = SLOWEST_KEPT) -> None:
        self._lock = threading.Lock()
        self._slowest_kept = slowest_kept
        self._totals = dict.fromkeys(_STEP_SUMS, 0)
        self._latencies: collections.deque[int] = collections.deque(maxlen=max_step_latencies)
        self._slowest: list[tuple[int, int, str, int, int, str]] = []  # min-heap of (ns, index, phase, sequences, trace id, generations)
        self._layers: dict[str, list[int]] = {field: [] for field in (*_LAYER_FIELDS.values(), "computes", "transfers")}
        self._offload: dict[str, Any] = {}
        self._steps = 0
        self._phase_steps: collections.Counter[str] = collections.Counter()
        self._step_ns = 0
        self._generations = 0
        self._layer_detail_steps = 0

    def reset_lock_after_fork(self) -> None:
        """In a forked child: a lock another thread held at the fork would never be released."""
        self._lock = threading.Lock()

    def add(self, name: str, start_ns: int, end_ns: int, attributes: Mapping[str, Any], trace_id: int) -> None:
        with self._lock:
            if name == names.SPAN_STEP:
                self._add_step(end_ns - start_ns, attributes, trace_id)
            elif attributes.get(names.GEN_AI_OPERATION_NAME) is not None:
                self._generations += 1

    def add_view(self, span: SpanView) -> None:
        """Add a span read back from a file. Raises ValueError naming the attribute when a step
        span's figures are not what this package writes (checked here only: live spans are ours)."""
        if span.name == names.SPAN_STEP:
            _check_step_figures(span.attributes)
        self.add(span.name, span.start_ns, span.end_ns, span.attributes, span.trace_id)

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def generated_tokens(self) -> int:
        return self._totals[names.STEP_GENERATED_TOKENS]

    def _add_step(self, duration_ns: int, attributes: Mapping[str, Any], trace_id: int) -> None:
        self._steps += 1
        self._step_ns += duration_ns
        for key in _STEP_SUMS:
            self._totals[key] += int(attributes.get(key, 0))
        self._latencies.append(duration_ns)
        self._phase_steps[str(attributes.get(names.STEP_PHASE, ""))] += 1
        if attributes.get(names.STEP_LAYER_DETAIL):
            self._layer_detail_steps += 1
        for key in (names.OFFLOAD_GPU_LAYERS, names.OFFLOAD_CPU_LAYERS, names.OFFLOAD_OFFLOADED_BYTES, names.OFFLOAD_DEVICE_POOL_BYTES, names.OFFLOAD_PINNED_BYTES, names.OFFLOAD_DEVICE):
            if key in attributes:
                self._offload[key] = attributes[key]
        self._add_layers(attributes)
        slowest = self._slowest
        if len(slowest) >= self._slowest_kept and duration_ns <= slowest[0][0]:
            return  # not among the slowest: the entry is not even built (this runs every step)
        generations = attributes.get(names.STEP_SEQUENCE_GENERATION_IDS) or ([attributes[names.GENERATION_ID]] if names.GENERATION_ID in attributes else [])
        entry = (
            duration_ns,
            int(attributes.get(names.STEP_INDEX, -1)),
            str(attributes.get(names.STEP_PHASE, "")),
            int(attributes.get(names.STEP_SEQUENCES, 0)),
            trace_id,
            ",".join(dict.fromkeys(str(g) for g in generations)),
        )
        if len(slowest) < self._slowest_kept:
            heapq.heappush(slowest, entry)
        elif entry > slowest[0]:
            heapq.heapreplace(slowest, entry)

    def _add_layers(self, attributes: Mapping[str, Any]) -> None:
        layers = self._layers
        for key, field in _LAYER_FIELDS.items():
            values = attributes.get(key)
            if values is None:
                continue
            totals = layers[field]
            if len(totals) < len(values):
                for column in layers.values():
                    column.extend([0] * (len(values) - len(column)))
            totals[: len(values)] = map(operator.add, totals, values)
            if field in ("compute_ns", "bytes"):
                counts = layers["computes" if field == "compute_ns" else "transfers"]
                counts[: len(values)] = map(operator.add, counts, map(bool, values))

    def snapshot(self, dropped_spans: int | None = 0) -> dict[str, Any]:
        """The metrics dict. Empty-run safe: with no steps, `enabled` says so and figures are None.
        `dropped_spans` None: not known (statistics read back from a file, which cannot hold what
        it lost)."""
        with self._lock:
            return _build_snapshot(self, dropped_spans)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_step_figures(attributes: Mapping[str, Any]) -> None:
    for key in (*_STEP_SUMS, names.STEP_INDEX):
        if key in attributes and not _is_int(attributes[key]):
            raise ValueError(f"step span attribute {key}={attributes[key]!r}: expected an integer")
    for key in _LAYER_FIELDS:
        values = attributes.get(key)
        if values is not None and not (isinstance(values, (list, tuple)) and all(_is_int(v) for v in values)):
            raise ValueError(f"step span attribute {key}={values!r}: expected an array of integers, one per layer")


def _ms(ns: float) -> float:
    return round(ns / 1e6, 3)


def _build_snapshot(stats: OffloadStats, dropped_spans: int | None) -> dict[str, Any]:
    totals = stats._totals
    gpu_layers = stats._offload.get(names.OFFLOAD_GPU_LAYERS)
    cpu_layers = stats._offload.get(names.OFFLOAD_CPU_LAYERS)
    if not stats._steps:
        return {"enabled": False, "steps": 0, "reason": "no step spans were recorded", "dropped_spans": dropped_spans}
    compute, transfer, release = totals[names.STEP_COMPUTE_NS], totals[names.STEP_TRANSFER_NS], totals[names.STEP_RELEASE_NS]
    overlap, transfers = totals[names.STEP_OVERLAP_NS], totals[names.STEP_TRANSFERS]
    generated = totals[names.STEP_GENERATED_TOKENS]
    overhead = transfer + release
    latencies = sorted(stats._latencies)
    offloaded_bytes = stats._offload.get(names.OFFLOAD_OFFLOADED_BYTES, 0)
    pool_bytes = stats._offload.get(names.OFFLOAD_DEVICE_POOL_BYTES, 0)
    return {
        "enabled": bool(cpu_layers),
        "gpu_layers": gpu_layers,
        "cpu_layers": cpu_layers,
        # The seeds' fields, with the seeds' meanings: overhead is all copy and release time.
        "transfer_overhead_ms": _ms(overhead),
        "avg_layer_transfer_ms": _ms(transfer / transfers) if transfers else 0.0,
        "overhead_percentage": round(100 * overhead / (overhead + compute), 2) if overhead + compute else 0.0,
        "time_breakdown": {
            "pure_computation_ms": _ms(compute),
            "cpu_to_gpu_transfer_ms": _ms(transfer),
            "gpu_to_cpu_release_ms": _ms(release),
        },
        # What perfect overlap would still save: per step, copies fully hidden behind compute
        # would cost max(compute, transfer) instead of compute + transfer - overlap already achieved.
        "theoretical_async_savings_ms": _ms(max(0, min(compute, transfer) - overlap)),
        "vram_saved_gb": round((offloaded_bytes - pool_bytes) / 1e9, 4) if cpu_layers else 0.0,
        # Beyond the seeds.
        "device": stats._offload.get(names.OFFLOAD_DEVICE),
        "steps": stats._steps,
        "steps_by_phase": dict(sorted(stats._phase_steps.items())),
        "processed_tokens": totals[names.STEP_TOKENS],
        "generated_tokens": generated,
        "generations": stats._generations,
        # Speculative decoding: drafted tokens verified, and the share the model kept.
        "drafted_tokens": totals[names.STEP_DRAFTED_TOKENS],
        "accepted_tokens": totals[names.STEP_ACCEPTED_TOKENS],
        "acceptance_rate": round(totals[names.STEP_ACCEPTED_TOKENS] / totals[names.STEP_DRAFTED_TOKENS], 4) if totals[names.STEP_DRAFTED_TOKENS] else None,
        "draft_forwards": totals[names.STEP_DRAFT_FORWARDS],
        "draft_ms": _ms(totals[names.STEP_DRAFT_NS]),
        "step_latency_ms": {
            **{f"p{p}": _ms(_percentile(latencies, p)) for p in PERCENTILES},
            "mean": _ms(sum(latencies) / len(latencies)),
            "max": _ms(latencies[-1]),
        },
        # Per generated token: what a batch divides (the weights stream once per forward).
        "per_generated_token": {
            "steps": round(stats._steps / generated, 4) if generated else None,
            "transfer_bytes": round(totals[names.STEP_TRANSFER_BYTES] / generated, 1) if generated else None,
            "transfer_ms": _ms(transfer / generated) if generated else None,
            "step_ms": _ms(stats._step_ns / generated) if generated else None,
        },
        "bytes_transferred": totals[names.STEP_TRANSFER_BYTES],
        "transfer_gbps": round(totals[names.STEP_TRANSFER_BYTES] / transfer, 3) if transfer else 0.0,
        "overlap_efficiency": round(overlap / transfer, 4) if transfer else 0.0,
        "prefetched_share": round(totals[names.STEP_PREFETCHED] / transfers, 4) if transfers else 0.0,
        "exposed_transfer_ms": _ms(transfer - overlap),
        "compute_wait_ms": _ms(totals[names.STEP_WAIT_NS]),
        "offloaded_bytes": offloaded_bytes,
        "device_pool_bytes": pool_bytes,
        "pinned_bytes": stats._offload.get(names.OFFLOAD_PINNED_BYTES, 0),
        "layer_detail_steps": stats._layer_detail_steps,
        "per_layer": {index: _layer_row({field: column[index] for field, column in stats._layers.items()}) for index in range(len(stats._layers["compute_ns"]))},
        "slowest_steps": [
            {"ms": _ms(ns), "step_index": index, "phase": phase, "sequences": sequences, "trace_id": f"{trace_id:032x}", "generation_ids": generations.split(",") if generations else []}
            for ns, index, phase, sequences, trace_id, generations in sorted(stats._slowest, reverse=True)
        ],
        "dropped_spans": dropped_spans,
    }


def _layer_row(row: Mapping[str, int]) -> dict[str, Any]:
    computes = row["computes"]
    return {
        "offloaded": row["transfers"] > 0,
        "computes": computes,
        "compute_ms": _ms(row["compute_ns"]),
        "avg_compute_ms": _ms(row["compute_ns"] / computes) if computes else 0.0,
        "transfers": row["transfers"],  # steps in which the layer was copied in
        "transfer_ms": _ms(row["transfer_ns"]),
        "release_ms": _ms(row["release_ns"]),
        "wait_ms": _ms(row["wait_ns"]),
        "bytes": row["bytes"],
        "overlap_efficiency": round(row["overlap_ns"] / row["transfer_ns"], 4) if row["transfer_ns"] else 0.0,
    }


def _percentile(sorted_values: list[int], p: float) -> float:
    """Linear-interpolated percentile of an already sorted list."""
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    rank = (len(sorted_values) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def stats_from_spans(spans: Iterable[SpanView], slowest_kept: int = SLOWEST_KEPT) -> dict[str, Any]:
    """The same aggregation, over spans read back from an export (`dropped_spans` None: a file
    cannot say what never reached it)."""
    stats = OffloadStats(slowest_kept=slowest_kept)
    for span in spans:
        stats.add_view(span)
    return stats.snapshot(dropped_spans=None)


class StatsSpanProcessor(SpanProcessor):
    """Feeds every span it sees into an `OffloadStats`. Never raises, never blocks on I/O."""

    def __init__(self, stats: OffloadStats) -> None:
        self.stats = stats
        self.errors = 0

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if span.name in names.LAYER_SPANS:
            return  # their figures are on the step span already
        try:
            self.stats.add(span.name, span.start_time or 0, span.end_time or 0, span.attributes or {}, span.context.trace_id)
        except Exception as error:  # noqa: BLE001 - statistics must never take the telemetry path down
            self.errors += 1
            if self.errors == 1:
                log.error("stats.span_rejected", span=span.name, error=repr(error))

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
