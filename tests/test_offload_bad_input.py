"""Every bad input the offloading issue names: a clear error, and the model left untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tracedoffload import ConfigError, DeviceUnavailableError, HookConflictError, LayerDiscoveryError, OffloadConfig, offload
from tests.tracing.conftest import tiny_model


def snapshot(model: nn.Module):
    """Everything offload() could change: tensor objects, their storage and device, and the hooks."""
    tensors = {name: (id(t), t.data_ptr(), t.device, t.dtype, t.clone()) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    hooks = {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}
    return tensors, hooks


def assert_untouched(model: nn.Module, before) -> None:
    tensors, hooks = snapshot(model)
    assert hooks == before[1]
    for name, (ident, pointer, device, dtype, values) in before[0].items():
        now = tensors[name]
        assert (now[0], now[1], now[2], now[3]) == (ident, pointer, device, dtype), name
        assert torch.equal(now[4], values), name


class TestBadInput:
    @pytest.mark.parametrize(
        "config, field",
        [
            (lambda: OffloadConfig(preset="gigantic"), "preset"),
            (lambda: OffloadConfig(num_layers_on_gpu=-1), "num_layers_on_gpu"),
            (lambda: OffloadConfig(num_layers_on_gpu=True), "num_layers_on_gpu"),
            (lambda: OffloadConfig(prefetch=9), "prefetch"),
            (lambda: OffloadConfig(residency="middle"), "residency"),
            (lambda: OffloadConfig(device="tpu"), "device"),
            (lambda: OffloadConfig(num_layers_on_gpu=4, preset="light"), "preset"),
        ],
    )
    def test_invalid_config_names_the_field(self, config, field):
        """An invalid config value raises ConfigError (a ValueError) naming the field and what is valid."""
        with pytest.raises(ConfigError) as error:
            config()
        assert error.value.field == field and isinstance(error.value, ValueError)
        assert "invalid" in str(error.value)

    def test_more_gpu_layers_than_the_model_has(self):
        """num_layers_on_gpu above the layer count names the range; the model is untouched."""
        model = tiny_model()
        before = snapshot(model)
        with pytest.raises(ConfigError, match=r"num_layers_on_gpu=7 is invalid: an integer from 0 to 6"):
            offload(model, OffloadConfig(num_layers_on_gpu=7))
        assert_untouched(model, before)

    def test_model_without_a_layer_list(self):
        """A model with no recognisable layer list names the paths looked for; untouched."""
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        before = snapshot(model)
        with pytest.raises(LayerDiscoveryError, match="model.layers.*transformer.h"):
            offload(model, OffloadConfig(num_layers_on_gpu=0))
        assert_untouched(model, before)

    def test_explicit_layers_make_any_module_work(self):
        """The same module offloads when its layers are given explicitly, with exact outputs."""
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
        x = torch.randn(2, 8)
        with torch.no_grad():
            expected = model(x)
            with offload(model, OffloadConfig(num_layers_on_gpu=1), layers=list(model)):
                assert torch.equal(model(x), expected)

    @pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
    def test_cuda_asked_for_without_a_gpu(self):
        """device='cuda' on a machine without one is a DeviceUnavailableError; untouched."""
        model = tiny_model()
        before = snapshot(model)
        with pytest.raises(DeviceUnavailableError, match="cuda"):
            offload(model, OffloadConfig(num_layers_on_gpu=2, device="cuda"))
        assert_untouched(model, before)

    def test_second_offload_is_refused(self):
        """offload() on an already offloaded model is a HookConflictError; the first stays working."""
        model = tiny_model()
        prompt = torch.arange(5).unsqueeze(0)
        with torch.no_grad():
            expected = model(prompt).logits
        with offload(model, OffloadConfig(num_layers_on_gpu=2)):
            with pytest.raises(HookConflictError, match="already offloaded"):
                offload(model, OffloadConfig(num_layers_on_gpu=3))
            with torch.no_grad():
                assert torch.equal(model(prompt).logits, expected)

    @pytest.mark.parametrize("attribute, owner", [("_hf_hook", "accelerate"), ("_diffusers_hook", "diffusers")])
    def test_foreign_offload_hooks_are_refused(self, attribute, owner):
        """A module carrying accelerate's or diffusers' hook is refused, naming the library; untouched."""
        model = tiny_model()
        setattr(model.model.layers[1], attribute, object())
        before = snapshot(model)
        with pytest.raises(HookConflictError, match=owner):
            offload(model, OffloadConfig(num_layers_on_gpu=2))
        assert_untouched(model, before)

    def test_dtype_mismatch_is_refused(self):
        """A config dtype other than the weights' dtype names both; untouched."""
        model = tiny_model()
        before = snapshot(model)
        with pytest.raises(ConfigError, match="dtype"):
            offload(model, OffloadConfig(num_layers_on_gpu=2, dtype=torch.float16))
        assert_untouched(model, before)

    def test_meta_weights_are_refused(self):
        """A model still on the meta device (weights not loaded) is refused before any change."""
        with torch.device("meta"):
            model = tiny_model()
        with pytest.raises(Exception, match="meta device"):
            offload(model, OffloadConfig(num_layers_on_gpu=2))


class TestTierPresets:
    def test_a_gpu_tier_preset_goes_straight_to_offload(self):
        """OffloadConfig(preset="8gb") is resolved by offload() itself to the layers that fit (all, for a tiny model)."""
        model = tiny_model()
        with offload(model, OffloadConfig(preset="8gb", prefetch=2)) as offloader:
            assert len(offloader.resident_indices) == 6
            assert offloader.config.prefetch == 2 and offloader.config.num_layers_on_gpu == 6

    def test_non_float_dtype_is_refused(self):
        """dtype must be a floating-point dtype."""
        with pytest.raises(ConfigError, match="floating-point"):
            OffloadConfig(dtype=torch.int8)


class TestLibraryEdges:
    @pytest.mark.parametrize("model", [None, "model", 3])
    def test_a_model_that_is_not_a_module(self, model):
        """offload(None) and the like name the field, not a raw AttributeError."""
        with pytest.raises(ConfigError, match=r"model=.* a torch.nn.Module"):
            offload(model, OffloadConfig(num_layers_on_gpu=2))

    def test_the_library_writes_nothing_to_stdout_and_configures_no_logging(self):
        """Used as a library, offloading logs through the standard library only: nothing on
        stdout, and with no logging set up the info events print nowhere."""
        import subprocess
        import sys

        script = (
            "from tracedoffload import offload, OffloadConfig\n"
            "from tests.tracing.conftest import tiny_model\n"
            "offload(tiny_model(), OffloadConfig(num_layers_on_gpu=2)).detach()\n"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout == ""
        assert "offload.attached" not in done.stderr
