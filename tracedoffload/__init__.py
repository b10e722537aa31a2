"""tracedoffload: layer-wise CPU<->GPU offloading for transformers inference, traced end to end."""

__version__ = "0.1.0"

from tracedoffload._exceptions import (
    ConfigError,
    DeviceUnavailableError,
    HookConflictError,
    LayerDiscoveryError,
    TracedOffloadError,
)
from tracedoffload.config import PRESETS, OffloadConfig
from tracedoffload.layers import find_decoder_layers
from tracedoffload.offloader import Offloader, offload
from tracedoffload.timeline import LayerRecord, RecordingTimeline, Timeline

__all__ = [
    "PRESETS",
    "ConfigError",
    "DeviceUnavailableError",
    "HookConflictError",
    "LayerDiscoveryError",
    "LayerRecord",
    "OffloadConfig",
    "Offloader",
    "RecordingTimeline",
    "Timeline",
    "TracedOffloadError",
    "find_decoder_layers",
    "offload",
]
