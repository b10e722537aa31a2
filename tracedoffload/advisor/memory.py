"""Peak device memory of a candidate: the planner's five terms (`tracedoffload.vram`) over the
sizes the trace carries, with the KV cache and the activations of what the run really held and
computed rather than the planner's worst case."""

from __future__ import annotations

from tracedoffload.advisor.measured import MeasuredRun
from tracedoffload.advisor.model import Choice
from tracedoffload.vram import VramEstimate, vram_from_sizes


def peak_device_memory(run: MeasuredRun, choice: Choice) -> VramEstimate:
    """Device bytes `choice` would hold at its peak.

    KV cache: the most KV tokens the run's decode steps at this batch size held, at the planner's
    bytes per token. Activations: one layer's peak intermediates for the run's largest forward (its
    longest prefill), plus one position's logits per sequence. On a CPU device this is host memory.
    `serve`'s paged KV cache is allocated whole up front: its size is serve's setting, not a
    residency's, and is not what this counts.
    """
    kv_tokens = run.batch(choice.sequences).kv_tokens
    return vram_from_sizes(
        run.layer_bytes,
        run.base_bytes,
        choice.gpu_layers,
        prefetch=choice.prefetch,
        residency=choice.residency,
        kv_cache_bytes=run.kv_bytes_per_token * kv_tokens,
        activation_bytes=run.activation_bytes_per_token * run.largest_forward_tokens + run.logits_bytes * choice.sequences,
    )
