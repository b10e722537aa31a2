"""The public surface: what `import tracedoffload` offers, sorted, and nothing drifting in unnoticed."""

from __future__ import annotations

import tracedoffload

EXPECTED = [
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
    "TracingStateError",
    "TracingSession",
    "auto_config",
    "config_for_tier",
    "find_decoder_layers",
    "load_model",
    "offload",
]


class TestExportedMembers:
    def test_all_is_the_documented_surface(self):
        """__all__ lists exactly the expected names (constants, classes, functions, each sorted) and each resolves."""
        assert tracedoffload.__all__ == EXPECTED
        for name in EXPECTED:
            assert getattr(tracedoffload, name) is not None

    def test_config_error_is_a_value_error(self):
        """ConfigError can be caught as a ValueError, as the issue asks."""
        assert issubclass(tracedoffload.ConfigError, ValueError)
        assert issubclass(tracedoffload.ConfigError, tracedoffload.TracedOffloadError)
