"""tracedoffload: layer-wise CPU<->GPU offloading for transformers inference, traced end to end.

The names below are imported on first use (PEP 562): `import tracedoffload` and the command
line's help and argument errors need neither torch nor transformers, which take seconds to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tracedoffload._lazy import lazy_exports
from tracedoffload._version import __version__

# Each public name and the module that defines it.
_EXPORTS = {
    "GPU_TIERS": "tracedoffload.presets",
    "PRESETS": "tracedoffload.presets",
    "ConfigError": "tracedoffload._exceptions",
    "DeviceUnavailableError": "tracedoffload._exceptions",
    "HookConflictError": "tracedoffload._exceptions",
    "LayerDiscoveryError": "tracedoffload._exceptions",
    "LayerRecord": "tracedoffload.timeline",
    "LoadedModel": "tracedoffload.models",
    "ModelLoadError": "tracedoffload._exceptions",
    "ModelPlan": "tracedoffload.planner",
    "OffloadConfig": "tracedoffload.config",
    "Offloader": "tracedoffload.offloader",
    "RecordingTimeline": "tracedoffload.timeline",
    "SamplingPolicy": "tracedoffload.tracing.sampling",
    "Timeline": "tracedoffload.timeline",
    "TracedOffloadError": "tracedoffload._exceptions",
    "TracingStateError": "tracedoffload._exceptions",
    "TracingSession": "tracedoffload.tracing.session",
    "auto_config": "tracedoffload.planner",
    "config_for_tier": "tracedoffload.planner",
    "find_decoder_layers": "tracedoffload.layers",
    "load_model": "tracedoffload.models",
    "offload": "tracedoffload.offloader",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # what type checkers and IDEs read
    from tracedoffload._exceptions import (
        ConfigError,
        DeviceUnavailableError,
        HookConflictError,
        LayerDiscoveryError,
        ModelLoadError,
        TracedOffloadError,
        TracingStateError,
    )
    from tracedoffload.config import OffloadConfig
    from tracedoffload.layers import find_decoder_layers
    from tracedoffload.models import LoadedModel, load_model
    from tracedoffload.offloader import Offloader, offload
    from tracedoffload.planner import ModelPlan, auto_config, config_for_tier
    from tracedoffload.presets import GPU_TIERS, PRESETS
    from tracedoffload.timeline import LayerRecord, RecordingTimeline, Timeline
    from tracedoffload.tracing.sampling import SamplingPolicy
    from tracedoffload.tracing.session import TracingSession
