"""The planner: exact bytes from the model (meta device), KV bytes, the table, tiers, auto, and the plan CLI."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import Qwen2Config

from tracedoffload import ConfigError, DeviceUnavailableError, OffloadConfig, TracedOffloadError, offload
from tracedoffload.cli import main
from tracedoffload.planner import GPU_TIERS, ModelPlan, auto_config, config_for_tier, estimate_vram, kv_bytes_per_token, plan_table
from tests.tracing.conftest import tiny_model


def seven_b_config() -> Qwen2Config:
    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)


class TestModelPlan:
    def test_bytes_per_layer_equal_what_the_offloader_moves(self):
        """The planner's bytes per layer equal Offloader.layer_bytes for every offloaded layer."""
        model = tiny_model()
        plan = ModelPlan.from_model(model)
        with offload(model, OffloadConfig(num_layers_on_gpu=0)) as offloader:
            assert [offloader.layer_bytes(i) for i in range(plan.num_layers)] == list(plan.layer_bytes)

    def test_a_7b_config_is_planned_on_the_meta_device(self):
        """A 7B Qwen2 config is planned in seconds without allocating its ~30 GB of weights."""
        started = time.monotonic()
        plan = ModelPlan.from_config(seven_b_config(), torch.bfloat16)
        assert time.monotonic() - started < 30
        total = plan.base_bytes + sum(plan.layer_bytes)
        assert 7.0e9 * 2 < total < 8.0e9 * 2  # about 7.6B parameters in bfloat16
        assert plan.num_layers == 28 and len(set(plan.layer_bytes)) == 1

    def test_kv_bytes_per_token(self):
        """KV bytes per token = 2 x layers x KV heads x head dim x dtype size."""
        assert kv_bytes_per_token(seven_b_config(), torch.bfloat16) == 2 * 28 * 4 * 128 * 2

    def test_from_a_config_json_path(self, tmp_path):
        """A directory with a config.json is planned from the config alone."""
        seven_b_config().save_pretrained(tmp_path)
        assert ModelPlan.from_path(tmp_path, torch.float16).num_layers == 28

    def test_a_missing_path_is_a_clear_error(self, tmp_path):
        """A path without config.json names the path and what is expected."""
        with pytest.raises(TracedOffloadError, match="config.json"):
            ModelPlan.from_path(tmp_path / "nowhere")


class TestTable:
    def test_more_resident_layers_need_more_vram(self):
        """Estimated VRAM never decreases as resident layers increase (prefetch pool included)."""
        plan = ModelPlan.from_config(seven_b_config(), torch.bfloat16)
        rows = plan_table(plan, every_k=True)
        vram = [row.vram_bytes for row in sorted(rows, key=lambda r: r.gpu_layers)]
        assert vram == sorted(vram)
        assert rows[0].gpu_layers == 28 and rows[0].copy_ms_per_token == 0

    def test_presets_are_labelled(self):
        """The preset rows carry their names, scaled to 28 layers."""
        plan = ModelPlan.from_config(seven_b_config(), torch.bfloat16)
        labels = {row.label: row.gpu_layers for row in plan_table(plan)}
        assert labels == {"resident": 28, "light": 20, "moderate": 16, "balanced": 12, "aggressive": 8, "extreme": 4}

    def test_bad_bandwidth_names_the_field(self):
        """A zero bandwidth is refused with the field named."""
        with pytest.raises(ConfigError, match="bandwidth_gbps"):
            plan_table(ModelPlan.from_model(tiny_model()), bandwidth_gbps=0)


class TestTiersAndAuto:
    def test_tier_keeps_as_many_layers_as_fit(self):
        """A 12 GB tier keeps the most layers whose estimate fits 12 GiB, and one more would not fit."""
        plan = ModelPlan.from_config(seven_b_config(), torch.bfloat16)
        config = config_for_tier(plan, "12gb")
        k = config.num_layers_on_gpu
        assert 0 < k < 28 and estimate_vram(plan, k) <= GPU_TIERS["12gb"] < estimate_vram(plan, k + 1)

    def test_auto_uses_the_free_memory_given(self):
        """auto picks the largest k fitting target_utilization x free - headroom."""
        plan = ModelPlan.from_config(seven_b_config(), torch.bfloat16)
        config = auto_config(plan, free_bytes=12 << 30, target_utilization=0.9, headroom_bytes=256 << 20)
        k = config.num_layers_on_gpu
        budget = int((12 << 30) * 0.9) - (256 << 20)
        assert estimate_vram(plan, k) <= budget < estimate_vram(plan, k + 1)

    def test_auto_raises_when_nothing_fits(self):
        """Too little memory even for zero resident layers is a ConfigError stating what is needed."""
        plan = ModelPlan.from_config(seven_b_config(), torch.bfloat16)
        with pytest.raises(ConfigError, match="at least"):
            auto_config(plan, free_bytes=1 << 30)

    def test_auto_without_a_gpu_needs_free_bytes(self):
        """Without CUDA and without free_bytes, auto says it has nothing to measure."""
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        with pytest.raises(DeviceUnavailableError):
            auto_config(ModelPlan.from_model(tiny_model()))

    @pytest.mark.parametrize("value", [0, 1.5, -0.1])
    def test_target_utilization_range(self, value):
        """target_utilization outside (0, 1] is refused with the field named."""
        with pytest.raises(ConfigError, match="target_utilization"):
            auto_config(ModelPlan.from_model(tiny_model()), free_bytes=1 << 40, target_utilization=value)


class TestPlanCommand:
    def test_default_table(self, capsys):
        """`tracedoffload plan` prints the preset table for the embedded model."""
        assert main(["plan"]) == 0
        out = capsys.readouterr().out
        for label in ("balanced", "extreme", "vram GiB", "copy ms/tok"):
            assert label in out

    def test_json_for_a_local_config(self, capsys, tmp_path):
        """--model with a config.json directory and --json gives machine-readable rows."""
        seven_b_config().save_pretrained(tmp_path)
        assert main(["plan", "--model", str(tmp_path), "--dtype", "bfloat16", "--json", "--tier", "24gb"]) == 0
        out = capsys.readouterr().out
        payload = json.loads(out[: out.rindex("}") + 1])
        assert payload["plan"]["num_layers"] == 28 and payload["rows"]

    def test_missing_model_exits_2(self, capsys, tmp_path):
        """A missing --model path is one error line and exit status 2."""
        assert main(["plan", "--model", str(tmp_path / "missing")]) == 2
        assert "config.json" in capsys.readouterr().err
