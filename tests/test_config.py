"""OffloadConfig validation, preset scaling and residency policies (tracedoffload.config)."""

from __future__ import annotations

import pytest
import torch

from tracedoffload import ConfigError, OffloadConfig, offload
from tracedoffload.config import PRESETS, parse_device, resident_layer_indices, scale_preset
from tests.tracing.conftest import tiny_model


class TestOffloadConfigValidation:
    @pytest.mark.parametrize(
        "fields, field, valid",
        [
            ({"num_layers_on_gpu": -1}, "num_layers_on_gpu", ">= 0"),
            ({"num_layers_on_gpu": True}, "num_layers_on_gpu", "integer >= 0"),
            ({"num_layers_on_gpu": "4"}, "num_layers_on_gpu", "integer >= 0"),
            ({"num_layers_on_gpu": 2.0}, "num_layers_on_gpu", "integer >= 0"),
            ({"preset": "gigantic"}, "preset", "balanced"),
            ({"num_layers_on_gpu": 4, "preset": "light"}, "preset", "choose one"),
            ({"prefetch": -1}, "prefetch", "0 to 8"),
            ({"prefetch": 9}, "prefetch", "0 to 8"),
            ({"prefetch": True}, "prefetch", "0 to 8"),
            ({"prefetch": "1"}, "prefetch", "0 to 8"),
            ({"residency": "middle"}, "residency", "interleaved"),
            ({"device": "tpu"}, "device", "cuda:N"),
            ({"device": "not a device"}, "device", "cuda:N"),
            ({"dtype": "float16"}, "dtype", "torch.dtype"),
            ({"pin_memory": "yes"}, "pin_memory", "True or False"),
        ],
    )
    def test_invalid_field_names_field_and_valid_range(self, fields, field, valid):
        """Each invalid field raises ConfigError (a ValueError) naming the field and what is valid."""
        with pytest.raises(ConfigError) as error:
            OffloadConfig(**fields)
        assert isinstance(error.value, ValueError)
        assert error.value.field == field
        assert valid in error.value.valid
        assert str(error.value).startswith(f"{field}=") and valid in str(error.value)

    @pytest.mark.parametrize(
        "fields",
        [{}, {"num_layers_on_gpu": 0}, {"preset": "extreme"}, {"preset": "12gb"}, {"device": "cpu"}, {"device": "cuda:1"}, {"dtype": torch.bfloat16}, {"prefetch": 8}],
    )
    def test_valid_configs_are_accepted(self, fields):
        """Valid fields, GPU tier presets and CUDA spellings build without touching a device."""
        OffloadConfig(**fields)

    def test_more_gpu_layers_than_the_model_has_raises_at_resolve(self):
        """num_layers_on_gpu above the layer count is only known against a model, and is refused there."""
        config = OffloadConfig(num_layers_on_gpu=7)
        assert OffloadConfig(num_layers_on_gpu=6).layers_on_gpu(6) == 6
        with pytest.raises(ConfigError, match="from 0 to 6"):
            config.layers_on_gpu(6)

    def test_tier_preset_is_resolved_by_the_planner(self):
        """A GPU tier preset cannot be resolved from the layer count alone; the error points at the planner."""
        with pytest.raises(ConfigError, match="config_for_tier"):
            OffloadConfig(preset="12gb").layers_on_gpu(28)


class TestPresets:
    def test_presets_are_the_seeds_layers_of_28(self):
        """Against 28 layers every preset keeps the seeds' number of GPU layers, balanced by default."""
        assert {name: OffloadConfig(preset=name).layers_on_gpu(28) for name in PRESETS} == PRESETS
        assert OffloadConfig().layers_on_gpu(28) == 12

    @pytest.mark.parametrize("num_layers", [1, 2, 6, 14, 28, 32, 80])
    def test_presets_scale_to_the_layer_count(self, num_layers):
        """Scaled presets keep their order, stay within 1..num_layers, and keep the share of 28."""
        scaled = [scale_preset(PRESETS[name], num_layers) for name in PRESETS]
        assert scaled == sorted(scaled, reverse=True)
        assert all(1 <= k <= num_layers for k in scaled)
        for name, k in zip(PRESETS, scaled):
            assert abs(k - PRESETS[name] * num_layers / 28) <= 1

    def test_half_the_layers_halve_the_preset(self):
        """A 14-layer model keeps half the layers of the 28-layer figure."""
        assert scale_preset(12, 14) == 6 and scale_preset(20, 14) == 10

    def test_no_layers_keep_none(self):
        """A model without layers keeps zero resident (the floor of one needs a layer to keep)."""
        assert scale_preset(4, 0) == 0


class TestResidency:
    def test_first_keeps_the_leading_layers(self):
        """'first' keeps layers 0..k-1 resident."""
        assert resident_layer_indices("first", 8, 3) == (0, 1, 2)

    def test_last_keeps_the_trailing_layers(self):
        """'last' keeps the final k layers resident."""
        assert resident_layer_indices("last", 8, 3) == (5, 6, 7)

    def test_interleaved_spreads_the_offloaded_layers(self):
        """'interleaved' puts a resident layer before every offloaded one when at most half are offloaded."""
        for num_layers in range(1, 33):
            for k in range(num_layers + 1):
                resident = resident_layer_indices("interleaved", num_layers, k)
                assert len(resident) == k and list(resident) == sorted(set(resident))
                assert all(0 <= i < num_layers for i in resident)
                offloaded = [i for i in range(num_layers) if i not in resident]
                if len(offloaded) <= k:
                    assert all(i - 1 in resident for i in offloaded), (num_layers, k)

    def test_interleaved_28_of_balanced(self):
        """The balanced preset on 28 layers offloads 16 layers spread to the end, not a block."""
        resident = resident_layer_indices("interleaved", 28, 12)
        offloaded = [i for i in range(28) if i not in resident]
        assert offloaded[-1] == 27 and max(b - a for a, b in zip(offloaded, offloaded[1:])) == 2

    def test_unknown_policy_and_count_are_refused(self):
        """An unknown policy or a resident count outside 0..n raises ConfigError naming the field."""
        with pytest.raises(ConfigError, match="residency"):
            resident_layer_indices("middle", 4, 2)
        with pytest.raises(ConfigError, match="num_layers_on_gpu"):
            resident_layer_indices("first", 4, 5)

    @pytest.mark.parametrize("residency, expected", [("first", (0, 1)), ("last", (4, 5)), ("interleaved", (1, 4))])
    def test_offloader_keeps_the_policy_layers_resident(self, residency, expected):
        """The offloader keeps exactly the layers the policy names resident."""
        config = OffloadConfig(num_layers_on_gpu=2, residency=residency, device="cpu")
        with offload(tiny_model(), config) as offloader:
            assert offloader.resident_indices == expected == resident_layer_indices(residency, 6, 2)


class TestParseDevice:
    def test_auto_is_resolved_later(self):
        """'auto' parses to None; explicit spellings parse to torch devices."""
        assert parse_device("auto") is None
        assert parse_device("cpu") == torch.device("cpu")
        assert parse_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
