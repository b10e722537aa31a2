"""The named choices of an offload, as plain data: layer-count presets, GPU tiers, residency
policies, and the device the planner assumes. No torch here: the command line lists them in its
help and checks them without loading anything."""

from __future__ import annotations

# Layers kept on the GPU out of the seeds' 28-layer backbone; scaled to the model's layer count.
PRESETS: dict[str, int] = {
    "light": 20,
    "moderate": 16,
    "balanced": 12,
    "aggressive": 8,
    "extreme": 4,
}
PRESET_REFERENCE_LAYERS = 28
DEFAULT_PRESET = "balanced"

RESIDENCY_POLICIES = ("interleaved", "first", "last")
# Interleaving gives every offloaded layer's copy a resident layer's compute to hide behind
# (vLLM's prefetch offloader does the same); "first"/"last" leave a run of offloaded layers
# whose copies can only hide behind each other.
DEFAULT_RESIDENCY = "interleaved"
# Offloaded layers copied ahead of the one computing; the device slot pool holds prefetch + 1.
MAX_PREFETCH = 8

GiB = 1 << 30
# Device memory of common GPU tiers (bytes); a tier preset keeps as many layers as fit in it.
GPU_TIERS: dict[str, int] = {
    "8gb": 8 * GiB,
    "12gb": 12 * GiB,
    "16gb": 16 * GiB,
    "24gb": 24 * GiB,
    "40gb": 40 * GiB,
    "80gb": 80 * GiB,
}

# What the planner assumes of a device it cannot see: a GPU of the seeds' 12 GB tier.
# PCIe 4.0 x16, measured pinned host-to-device rate (research/offloading-anchors.md).
DEFAULT_BANDWIDTH_GBPS = 25.0
# Device memory bandwidth for the estimated per-token compute time: the RTX 4070 12 GB's spec
# (192-bit GDDR6X at 21 Gbps), a card of the seeds' 12 GB tier. Pass a measured compute time instead.
DEFAULT_DEVICE_MEMORY_GBPS = 504.0
DEFAULT_KV_TOKENS = 4096
DEFAULT_TARGET_UTILIZATION = 0.9  # accelerate's share of free memory, too
