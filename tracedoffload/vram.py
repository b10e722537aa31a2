"""The VRAM estimate's arithmetic over plain sizes, without torch: the planner computes it for a
model it has built (`planner.estimate_vram`), the advisor for the sizes a trace carries
(`tracedoffload.advisor`). The five terms are described in `tracedoffload.planner`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tracedoffload._checks import check_int
from tracedoffload.config import resident_layer_indices
from tracedoffload.presets import MAX_PREFETCH


@dataclasses.dataclass(frozen=True)
class VramEstimate:
    """Device bytes for one residency, term by term (see `tracedoffload.planner`)."""

    base_bytes: int
    resident_layer_bytes: int
    slot_pool_bytes: int
    kv_cache_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.base_bytes + self.resident_layer_bytes + self.slot_pool_bytes + self.kv_cache_bytes + self.activation_bytes


def vram_from_sizes(
    layer_bytes: Sequence[int],
    base_bytes: int,
    gpu_layers: int,
    *,
    prefetch: int,
    residency: str,
    kv_cache_bytes: int,
    activation_bytes: int,
) -> VramEstimate:
    """Device bytes with `gpu_layers` of the layers resident, the rest streamed through the slot pool.

    Args:
        layer_bytes: per decoder layer, the bytes one transfer moves (the packed layout).
        base_bytes: the tensors outside the decoder layers, always resident.
        gpu_layers: resident layers, chosen by `residency`.
        prefetch: offloaded layers copied ahead; the pool has min(prefetch + 1, offloaded) slots
            of the largest offloaded layer, as the offloader allocates it.
        kv_cache_bytes: the KV cache's bytes (the caller knows how many tokens it holds).
        activation_bytes: the peak intermediates (the caller knows the largest forward).

    Raises:
        ConfigError: `gpu_layers`, `prefetch` or `residency` out of range.
    """
    check_int("prefetch", prefetch, 0, MAX_PREFETCH)
    num_layers = len(layer_bytes)
    resident = set(resident_layer_indices(residency, num_layers, check_int("gpu_layers", gpu_layers, 0, num_layers)))
    offloaded = [size for i, size in enumerate(layer_bytes) if i not in resident]
    return VramEstimate(
        base_bytes=base_bytes,
        resident_layer_bytes=sum(layer_bytes[i] for i in resident),
        slot_pool_bytes=min(prefetch + 1, len(offloaded)) * max(offloaded, default=0),
        kv_cache_bytes=kv_cache_bytes,
        activation_bytes=activation_bytes,
    )
