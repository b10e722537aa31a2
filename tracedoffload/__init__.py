"""tracedoffload: layer-wise CPU<->GPU offloading for transformers inference, traced end to end."""

__version__ = "0.1.0"

from tracedoffload._exceptions import (
    ConfigError,
    DeviceUnavailableError,
    HookConflictError,
    LayerDiscoveryError,
    ModelLoadError,
    TracedOffloadError,
)
from tracedoffload.config import PRESETS, OffloadConfig
from tracedoffload.layers import find_decoder_layers
from tracedoffload.models import LoadedModel, load_model
from tracedoffload.offloader import Offloader, offload
from tracedoffload.planner import GPU_TIERS, ModelPlan, auto_config, config_for_tier
from tracedoffload.timeline import LayerRecord, RecordingTimeline, Timeline
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import TracingSession

__all__ = [
    "GPU_TIERS",
    "PRESETS",
    "ConfigError",
    "DeviceUnavailableError",
    "HookConflictError",
    "LayerDiscoveryError",
    "LayerRecord",
    "LoadedModel",
    "ModelLoadError",
    "ModelPlan",
    "OffloadConfig",
    "Offloader",
    "RecordingTimeline",
    "SamplingPolicy",
    "Timeline",
    "TracedOffloadError",
    "TracingSession",
    "auto_config",
    "config_for_tier",
    "find_decoder_layers",
    "load_model",
    "offload",
]
