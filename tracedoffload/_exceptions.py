"""The errors tracedoffload raises.

    TracedOffloadError
    ├── ConfigError (also a ValueError)   a setting is out of range or unknown
    ├── LayerDiscoveryError               no decoder layer list could be found
    ├── DeviceUnavailableError            the compute device asked for is not there
    ├── ModelLoadError                    a model cannot be found, read or converted
    ├── TracingStateError (a RuntimeError) a tracing session used out of order
    └── HookConflictError                 the model already carries an offload hook

Every error is raised before the model is touched, so catching one leaves the model
exactly as it was.
"""

from __future__ import annotations


class TracedOffloadError(Exception):
    """Base class of every error raised by tracedoffload."""


class ConfigError(TracedOffloadError, ValueError):
    """A configuration value is invalid; the message names the field, the value and what is valid."""

    def __init__(self, field: str, value: object, valid: str) -> None:
        self.field = field
        self.value = value
        self.valid = valid
        super().__init__(f"{field}={value!r} is invalid: {valid}")


class LayerDiscoveryError(TracedOffloadError):
    """The model has no recognisable list of decoder layers."""


class DeviceUnavailableError(TracedOffloadError):
    """The requested compute device does not exist on this machine."""


class ModelLoadError(TracedOffloadError):
    """A model cannot be found, read or converted; the message names the path and what to do."""


class TracingStateError(TracedOffloadError, RuntimeError):
    """A tracing session was used out of order: after shutdown, on a detached or already traced
    offloader, in a forked child, or configured after attach; the message says what to do."""


class HookConflictError(TracedOffloadError):
    """The model is already offloaded, by tracedoffload or by another library's hooks."""
