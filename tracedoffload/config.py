"""What to offload and how: `OffloadConfig`, the presets, and the residency policies.

A config is validated when it is built (types and ranges that need no model) and resolved
against a model by `resolve_resident_layers` (ranges that depend on the layer count).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tracedoffload._checks import check_choice, check_int
from tracedoffload._exceptions import ConfigError
from tracedoffload.presets import DEFAULT_PRESET, DEFAULT_RESIDENCY, GPU_TIERS, MAX_PREFETCH, PRESET_REFERENCE_LAYERS, PRESETS, RESIDENCY_POLICIES

if TYPE_CHECKING:
    import torch


DEVICE_TYPES = ("cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    """How a model is offloaded.

    Args:
        num_layers_on_gpu: decoder layers kept resident on the compute device (manual mode).
            Leave as None to take it from `preset`.
        preset: one of `PRESETS` (scaled to the model's layer count) or a GPU tier from
            `tracedoffload.presets.GPU_TIERS`. Used when `num_layers_on_gpu` is None;
            defaults to "balanced".
        pin_memory: pin the host copies once at setup (CUDA only; ignored on a CPU device).
        prefetch: how many offloaded layers are copied ahead of the one computing (0 to `MAX_PREFETCH`, 8).
        residency: which layers stay resident: "interleaved", "first" or "last".
        device: compute device: "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:N".
        dtype: the floating-point dtype the model's weights are expected in; None accepts any.

    Raises:
        ConfigError: a field is out of range; the message names it and what is valid.
    """

    num_layers_on_gpu: int | None = None
    preset: str | None = None
    pin_memory: bool = True
    prefetch: int = 1
    residency: str = DEFAULT_RESIDENCY
    device: str | torch.device = "auto"
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.num_layers_on_gpu is not None:
            check_int("num_layers_on_gpu", self.num_layers_on_gpu, 0, meaning="or None to use a preset")
            if self.preset is not None:
                raise ConfigError("preset", self.preset, "None when num_layers_on_gpu is given (choose one of the two)")
        if self.preset is not None and self.preset not in _known_presets():
            raise ConfigError("preset", self.preset, f"one of {sorted(_known_presets())}")
        if not isinstance(self.pin_memory, bool):
            raise ConfigError("pin_memory", self.pin_memory, "True or False")
        check_int("prefetch", self.prefetch, 0, MAX_PREFETCH)
        check_choice("residency", self.residency, RESIDENCY_POLICIES)
        if self.dtype is not None and not _is_float_dtype(self.dtype):
            raise ConfigError("dtype", self.dtype, "a floating-point torch.dtype such as torch.float16, or None")
        parse_device(self.device)

    def layers_on_gpu(self, num_layers: int) -> int:
        """The number of resident layers for a model with `num_layers` decoder layers."""
        if self.num_layers_on_gpu is not None:
            if self.num_layers_on_gpu > num_layers:
                raise ConfigError("num_layers_on_gpu", self.num_layers_on_gpu, f"an integer from 0 to {num_layers} (the model's layer count)")
            return self.num_layers_on_gpu
        name = self.preset or DEFAULT_PRESET
        if name not in PRESETS:
            raise ConfigError("preset", name, "a GPU tier preset is resolved by tracedoffload.planner.config_for_tier(model, tier)")
        return scale_preset(PRESETS[name], num_layers)


def scale_preset(layers_of_reference: int, num_layers: int) -> int:
    """Scale a preset given for 28 layers to a model with `num_layers` layers (at least 1 resident)."""
    scaled = round(layers_of_reference * num_layers / PRESET_REFERENCE_LAYERS)
    return max(1, min(num_layers, scaled)) if num_layers else 0


def resident_layer_indices(policy: str, num_layers: int, num_resident: int) -> tuple[int, ...]:
    """The indices of the layers kept resident, by residency policy."""
    if policy not in RESIDENCY_POLICIES:
        raise ConfigError("residency", policy, f"one of {list(RESIDENCY_POLICIES)}")
    if not 0 <= num_resident <= num_layers:
        raise ConfigError("num_layers_on_gpu", num_resident, f"an integer from 0 to {num_layers}")
    if policy == "first":
        return tuple(range(num_resident))
    if policy == "last":
        return tuple(range(num_layers - num_resident, num_layers))
    # Spread the offloaded layers evenly, so each sits after as many resident layers as possible.
    num_offloaded = num_layers - num_resident
    offloaded = {((i + 1) * num_layers) // num_offloaded - 1 for i in range(num_offloaded)} if num_offloaded else set()
    return tuple(i for i in range(num_layers) if i not in offloaded)


def parse_device(device: str | torch.device) -> torch.device | None:
    """Validate a device spelling; returns None for "auto" (resolved later)."""
    if isinstance(device, str) and device == "auto":
        return None
    import torch  # here: a config of defaults is checked without torch (the command line's fast path)

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError("device", device, "'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if parsed.type not in DEVICE_TYPES:
        raise ConfigError("device", device, "'auto', 'cpu', 'cuda' or 'cuda:N'")
    return parsed


def _is_float_dtype(dtype: object) -> bool:
    import torch

    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _known_presets() -> Sequence[str]:
    return [*PRESETS, *GPU_TIERS]
