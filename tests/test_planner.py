"""The planner: exact bytes from the model (meta device), KV bytes, VRAM terms, the table, tiers, auto, and `tracedoffload plan`."""

from __future__ import annotations

import json
import resource

import pytest
import torch
from transformers import GPT2Config, Qwen2Config

from tracedoffload import ConfigError, DeviceUnavailableError, OffloadConfig, offload
from tracedoffload.cli import main
from tracedoffload.planner import (
    GPU_TIERS,
    ModelPlan,
    auto_config,
    config_for_tier,
    estimate_vram,
    fit_layers,
    format_table,
    kv_bytes_per_token,
    plan_table,
    table_to_dict,
)
from tests.tracing.conftest import tiny_model


def seven_b_config(**overrides) -> Qwen2Config:
    """Qwen2-7B's shape, built in code (nothing is downloaded)."""
    shape = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)
    return Qwen2Config(**{**shape, **overrides})


def small_config(**overrides) -> Qwen2Config:
    shape = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return Qwen2Config(**{**shape, **overrides})


@pytest.fixture(scope="module")
def seven_b() -> ModelPlan:
    return ModelPlan.from_config(seven_b_config(), torch.bfloat16)


class TestModelPlan:
    def test_bytes_per_layer_equal_what_the_offloader_moves(self):
        """The planner's bytes per layer equal Offloader.layer_bytes for every layer, alignment included."""
        model = tiny_model()
        plan = ModelPlan.from_model(model)
        with offload(model, OffloadConfig(num_layers_on_gpu=0, device="cpu")) as offloader:
            assert [offloader.layer_bytes(i) for i in range(plan.num_layers)] == list(plan.layer_bytes)
            assert offloader.offloaded_bytes == sum(plan.layer_bytes)

    def test_meta_plan_equals_the_real_model_plan(self):
        """Planning the config on the meta device gives the same bytes as planning the built model."""
        assert ModelPlan.from_config(small_config()) == ModelPlan.from_model(tiny_model())

    def test_a_tensor_shared_between_layers_stays_resident(self):
        """A tensor two layers share is left out of both layers' bytes, like the offloader does, and counted once in base."""
        model = tiny_model()
        before = ModelPlan.from_model(model)
        shared = model.model.layers[1].mlp.gate_proj.weight
        model.model.layers[0].mlp.gate_proj.weight = shared
        plan = ModelPlan.from_model(model)
        with offload(model, OffloadConfig(num_layers_on_gpu=0, device="cpu")) as offloader:
            assert [offloader.layer_bytes(i) for i in range(plan.num_layers)] == list(plan.layer_bytes)
        assert plan.layer_bytes[0] < before.layer_bytes[0] and plan.layer_bytes[1] < before.layer_bytes[1]
        assert plan.base_bytes == before.base_bytes + shared.numel() * shared.element_size()

    def test_tied_embeddings_are_counted_once(self):
        """Tying the LM head to the embedding removes exactly the head's bytes from base."""
        untied = ModelPlan.from_config(small_config())
        tied = ModelPlan.from_config(small_config(tie_word_embeddings=True))
        assert untied.base_bytes - tied.base_bytes == 96 * 32 * 4
        assert tied.layer_bytes == untied.layer_bytes

    def test_a_7b_config_is_planned_on_the_meta_device(self, seven_b):
        """A 7B Qwen2 config is planned without allocating its weights: peak RSS grows by under a tenth of them."""
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        plan = ModelPlan.from_config(seven_b_config(), torch.bfloat16)
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        assert peak_after - peak_before < plan.total_bytes / 10
        assert 7.0e9 * 2 < plan.total_bytes < 8.0e9 * 2  # about 7.6B parameters in bfloat16
        assert plan.num_layers == 28 and len(set(plan.layer_bytes)) == 1
        assert plan == seven_b

    def test_float8_halves_the_matrices_and_computes_in_bfloat16(self, seven_b):
        """float8 weights move about half the bf16 bytes per layer; KV and activations stay bfloat16."""
        plan = ModelPlan.from_config(seven_b_config(), torch.float8_e4m3fn)
        assert plan.dtype == torch.float8_e4m3fn and plan.compute_dtype == torch.bfloat16
        assert 0.49 < plan.layer_bytes[0] / seven_b.layer_bytes[0] < 0.51
        assert plan.kv_bytes_per_token == seven_b.kv_bytes_per_token

    def test_planning_leaves_the_callers_config_alone(self):
        """from_config does not write the planning dtype into the caller's config."""
        config = small_config()
        before = config.to_dict()
        ModelPlan.from_config(config, torch.float16)
        assert config.to_dict() == before

    def test_a_non_float_dtype_is_refused(self):
        """An integer dtype is a ConfigError naming dtype."""
        with pytest.raises(ConfigError, match="dtype"):
            ModelPlan.from_config(small_config(), torch.int8)


class TestFromPretrainedPath:
    def test_directory_and_file(self, tmp_path):
        """A directory with a config.json and the file itself plan the same, the dtype read from the config."""
        seven_b_config(dtype="bfloat16").save_pretrained(tmp_path)
        from_dir = ModelPlan.from_pretrained_path(tmp_path)
        assert from_dir.dtype == torch.bfloat16 and from_dir.num_layers == 28
        assert ModelPlan.from_pretrained_path(tmp_path / "config.json") == from_dir
        assert ModelPlan.from_pretrained_path(tmp_path, torch.float16).dtype == torch.float16

    def test_a_missing_path_names_the_path(self, tmp_path):
        """A path without config.json is a ConfigError on `path` saying what is expected."""
        with pytest.raises(ConfigError, match="config.json") as error:
            ModelPlan.from_pretrained_path(tmp_path / "nowhere")
        assert error.value.field == "path"

    @pytest.mark.parametrize("text", ["{not json", "{}"])
    def test_a_bad_config_is_a_config_error(self, tmp_path, text):
        """Invalid JSON or a config without model_type is a ConfigError, not a traceback."""
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ConfigError, match="reading it failed"):
            ModelPlan.from_pretrained_path(tmp_path)


class TestKvBytes:
    def test_grouped_query_heads(self):
        """KV bytes per token = 2 x layers x KV heads x head dim x dtype size."""
        assert kv_bytes_per_token(seven_b_config(), torch.bfloat16) == 2 * 28 * 4 * 128 * 2

    def test_explicit_head_dim_wins(self):
        """A config's head_dim is used instead of hidden_size // num_attention_heads."""
        assert kv_bytes_per_token(seven_b_config(head_dim=64), torch.float32) == 2 * 28 * 4 * 64 * 4

    def test_without_kv_heads_every_head_keeps_a_cache(self):
        """A config without num_key_value_heads (GPT-2) caches every attention head."""
        config = GPT2Config(n_layer=12, n_head=12, n_embd=768)
        assert kv_bytes_per_token(config, torch.float16) == 2 * 12 * 12 * 64 * 2

    def test_the_plan_carries_it(self, seven_b):
        """ModelPlan's KV bytes per token come from the same formula."""
        assert seven_b.kv_bytes_per_token == kv_bytes_per_token(seven_b_config(), torch.bfloat16)


class TestEstimateVram:
    def test_terms(self, seven_b):
        """The estimate is base + resident layers + slot pool + KV cache + activations, each as documented."""
        vram = estimate_vram(seven_b, 12, prefetch=2, kv_tokens=1000)
        layer = seven_b.layer_bytes[0]
        assert vram.base_bytes == seven_b.base_bytes and vram.resident_layer_bytes == 12 * layer
        assert vram.slot_pool_bytes == 3 * layer
        assert vram.kv_cache_bytes == 1000 * seven_b.kv_bytes_per_token
        assert vram.activation_bytes == 1000 * seven_b.activation_bytes_per_token + seven_b.logits_bytes
        assert vram.total_bytes == sum((vram.base_bytes, vram.resident_layer_bytes, vram.slot_pool_bytes, vram.kv_cache_bytes, vram.activation_bytes))

    def test_no_pool_when_nothing_is_offloaded(self, seven_b):
        """With every layer resident there is no slot pool."""
        assert estimate_vram(seven_b, 28).slot_pool_bytes == 0

    def test_pool_never_exceeds_the_offloaded_layers(self, seven_b):
        """One offloaded layer gets one slot whatever the prefetch depth, as the offloader allocates."""
        assert estimate_vram(seven_b, 27, prefetch=4).slot_pool_bytes == seven_b.layer_bytes[0]

    def test_more_kv_tokens_and_prefetch_cost_more(self, seven_b):
        """More tokens or a deeper prefetch never lowers the estimate."""
        assert estimate_vram(seven_b, 8, kv_tokens=100).total_bytes < estimate_vram(seven_b, 8, kv_tokens=200).total_bytes
        assert estimate_vram(seven_b, 8, prefetch=0).total_bytes < estimate_vram(seven_b, 8, prefetch=3).total_bytes

    @pytest.mark.parametrize("kwargs, field", [({"prefetch": 9}, "prefetch"), ({"kv_tokens": -1}, "kv_tokens"), ({"residency": "middle"}, "residency")])
    def test_bad_arguments_name_the_field(self, seven_b, kwargs, field):
        """Out-of-range arguments raise ConfigError naming the field."""
        with pytest.raises(ConfigError, match=field):
            estimate_vram(seven_b, 4, **kwargs)

    def test_more_layers_than_the_model_has(self, seven_b):
        """gpu_layers above the layer count is refused with the range."""
        with pytest.raises(ConfigError, match="from 0 to 28"):
            estimate_vram(seven_b, 29)


class TestPlanTable:
    def test_more_resident_layers_need_more_vram(self, seven_b):
        """Estimated VRAM rises and host bytes fall as resident layers increase, for every k."""
        rows = sorted(plan_table(seven_b, every_k=True).rows, key=lambda r: r.gpu_layers)
        assert [r.gpu_layers for r in rows] == list(range(29))
        vram = [r.vram.total_bytes for r in rows]
        assert vram == sorted(vram) and vram[0] < vram[-1]
        host = [r.host_bytes for r in rows]
        assert host == sorted(host, reverse=True) and host[-1] == 0

    def test_presets_are_labelled(self, seven_b):
        """The preset rows carry their names, scaled to 28 layers, most resident first."""
        rows = plan_table(seven_b).rows
        assert [(r.label, r.gpu_layers) for r in rows] == [
            ("resident", 28), ("light", 20), ("moderate", 16), ("balanced", 12), ("aggressive", 8), ("extreme", 4),
        ]

    def test_presets_scaling_to_the_same_count_share_a_row(self):
        """On 6 layers moderate and balanced both keep 3 layers: one row names both."""
        labels = [r.label for r in plan_table(ModelPlan.from_model(tiny_model())).rows]
        assert "moderate/balanced" in labels

    def test_copy_time_and_slowdown_bounds(self, seven_b):
        """Copy ms = host bytes / bandwidth; slowdowns are (compute + copy) and max(compute, copy) over compute."""
        table = plan_table(seven_b, bandwidth_gbps=20, compute_ms_per_token=50.0)
        for row in table.rows:
            assert row.copy_ms_per_token == pytest.approx(row.host_bytes / 20e9 * 1e3)
            assert row.slowdown_no_overlap == pytest.approx((50 + row.copy_ms_per_token) / 50)
            assert row.slowdown_full_overlap == pytest.approx(max(50, row.copy_ms_per_token) / 50)
            assert 1 <= row.slowdown_full_overlap <= row.slowdown_no_overlap
        assert table.rows[0].slowdown_no_overlap == 1 and table.compute_basis == "given"

    def test_estimated_compute_reads_every_weight_once(self, seven_b):
        """Without a measured compute time, it is every weight byte over the device memory bandwidth, and says so."""
        table = plan_table(seven_b, device_memory_gbps=1000)
        assert table.compute_ms_per_token == pytest.approx(seven_b.total_bytes / 1e12 * 1e3)
        assert "1000 GB/s" in table.compute_basis

    @pytest.mark.parametrize("field, value", [("bandwidth_gbps", 0), ("bandwidth_gbps", float("nan")), ("compute_ms_per_token", -1.0), ("device_memory_gbps", 0)])
    def test_bad_rates_name_the_field(self, seven_b, field, value):
        """A rate or time that is not a finite number > 0 is refused with the field named."""
        with pytest.raises(ConfigError, match=field):
            plan_table(seven_b, **{field: value})

    def test_text_and_json(self, seven_b):
        """The formatter prints every row and the assumptions; the dict form is JSON-serialisable."""
        table = plan_table(seven_b)
        text = format_table(table)
        for needle in ("balanced", "extreme", "vram GiB", "copy ms/tok", "25 GB/s", "estimated"):
            assert needle in text
        data = json.loads(json.dumps(table_to_dict(table)))
        assert data["plan"]["dtype"] == "bfloat16" and data["rows"][0]["vram"]["total_bytes"] == table.rows[0].vram.total_bytes


class TestAutoConfig:
    def test_picks_the_largest_k_that_fits(self, seven_b):
        """auto keeps the most layers whose estimate fits target_utilization x free - headroom, and one more would not fit."""
        config = auto_config(seven_b, free_bytes=12 << 30, target_utilization=0.9, headroom_bytes=256 << 20)
        k = config.num_layers_on_gpu
        budget = int((12 << 30) * 0.9) - (256 << 20)
        assert 0 < k < 28
        assert estimate_vram(seven_b, k).total_bytes <= budget < estimate_vram(seven_b, k + 1).total_bytes

    def test_everything_resident_when_it_all_fits(self, seven_b):
        """With room for the whole model every layer stays resident."""
        assert auto_config(seven_b, free_bytes=80 << 30).num_layers_on_gpu == 28

    def test_config_fields_shape_the_estimate(self, seven_b):
        """prefetch and kv_tokens given to auto are used in the fit and kept in the config."""
        deep = auto_config(seven_b, free_bytes=12 << 30, prefetch=4, kv_tokens=32768)
        assert deep.prefetch == 4
        assert deep.num_layers_on_gpu == fit_layers(seven_b, int((12 << 30) * 0.9), prefetch=4, kv_tokens=32768)
        assert deep.num_layers_on_gpu < auto_config(seven_b, free_bytes=12 << 30).num_layers_on_gpu

    def test_raises_when_nothing_fits(self, seven_b):
        """Too little memory even for zero resident layers names what is needed and what is available."""
        with pytest.raises(ConfigError, match=r"1\.00 GiB usable.*at least .* GiB even with every layer offloaded"):
            auto_config(seven_b, free_bytes=1 << 30, target_utilization=1.0)

    @pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
    def test_without_a_gpu_it_needs_free_bytes(self, seven_b):
        """Without CUDA and without free_bytes, auto raises DeviceUnavailableError saying to pass free_bytes."""
        with pytest.raises(DeviceUnavailableError, match="free_bytes"):
            auto_config(seven_b)

    @pytest.mark.parametrize(
        "kwargs, field",
        [
            ({"target_utilization": 0}, "target_utilization"),
            ({"target_utilization": 1.5}, "target_utilization"),
            ({"target_utilization": True}, "target_utilization"),
            ({"headroom_bytes": -1}, "headroom_bytes"),
            ({"free_bytes": 0}, "free_bytes"),
            ({"kv_tokens": -5}, "kv_tokens"),
            ({"num_layers_on_gpu": 3}, "num_layers_on_gpu"),
            ({"preset": "light"}, "preset"),
            ({"prefetch": 12}, "prefetch"),
            ({"colour": "blue"}, "colour"),
        ],
    )
    def test_bad_arguments_name_the_field(self, seven_b, kwargs, field):
        """Every bad argument raises ConfigError naming it."""
        with pytest.raises(ConfigError) as error:
            auto_config(seven_b, **{"free_bytes": 1 << 40, **kwargs})
        assert error.value.field == field

    def test_a_real_model_offloads_with_the_auto_config(self):
        """auto on a built model gives a config offload() accepts, with the planned layers resident."""
        model = tiny_model()
        plan = ModelPlan.from_model(model)
        budget = estimate_vram(plan, 2).total_bytes
        config = auto_config(model, free_bytes=budget, target_utilization=1.0, device="cpu")
        assert config.num_layers_on_gpu == 2
        with offload(model, config) as offloader:
            assert len(offloader.resident_indices) == 2


class TestGpuTiers:
    def test_tiers_are_lowercase_sizes(self):
        """Tier names are lowercase and map to bytes in ascending order."""
        assert list(GPU_TIERS) == ["8gb", "12gb", "16gb", "24gb", "40gb", "80gb"]
        assert all(GPU_TIERS[name] == int(name.removesuffix("gb")) << 30 for name in GPU_TIERS)

    def test_tier_keeps_as_many_layers_as_fit(self, seven_b):
        """A 12 GB tier keeps the most layers fitting 90% of 12 GiB, and one more would not fit."""
        k = config_for_tier(seven_b, "12gb").num_layers_on_gpu
        assert estimate_vram(seven_b, k).total_bytes <= int(GPU_TIERS["12gb"] * 0.9) < estimate_vram(seven_b, k + 1).total_bytes

    def test_bigger_tiers_keep_more_layers(self, seven_b):
        """Resident layers never decrease with the tier's memory."""
        counts = [config_for_tier(seven_b, tier).num_layers_on_gpu for tier in ("12gb", "16gb", "24gb")]
        assert counts == sorted(counts) and counts[-1] == 28

    def test_a_tier_too_small_and_an_unknown_tier(self, seven_b):
        """A tier that cannot hold even the base is a ConfigError; so is an unknown tier name."""
        with pytest.raises(ConfigError, match="even with every layer offloaded"):
            config_for_tier(seven_b, "8gb", kv_tokens=131072)
        with pytest.raises(ConfigError, match="GPU tiers"):
            config_for_tier(seven_b, "10gb")

    def test_a_tier_preset_is_a_valid_config_preset(self):
        """OffloadConfig accepts every tier as a preset name (resolved by config_for_tier)."""
        for tier in GPU_TIERS:
            assert OffloadConfig(preset=tier).preset == tier


class TestPlanCommand:
    def test_default_table(self, capsys):
        """`tracedoffload plan` prints the preset table for the default model (SmolLM2's 30 layers,
        read from the GGUF without converting it), and `--model random` for the random 28 layers."""
        assert main(["plan"]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[1].startswith("30 layers") and "weights float32" in out
        for needle in ("resident", "balanced", "extreme", "vram GiB", "saved GiB", "host GiB", "copy ms/tok", "slowdown"):
            assert needle in out
        assert main(["plan", "--model", "random"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("figures for: a GPU with 504 GB/s device memory") and "not this machine" in out
        assert out.splitlines()[1].startswith("28 layers")

    def test_measure_uses_this_machine(self, capsys):
        """--measure times this machine's copies and resident compute and says the figures are its own."""
        assert main(["plan", "--model", "random", "--measure", "--json"]) == 0
        payload = json.loads(capsys.readouterr().out)
        assert payload["figures_for"].startswith("this machine's CPU") and "measured" in payload["figures_for"]
        assert payload["bandwidth_gbps"] > 0 and payload["compute_ms_per_token"] > 0

    def test_table_for_a_local_directory(self, capsys, tmp_path):
        """--model with a directory holding config.json prints its table, and --tier the config it gives."""
        seven_b_config().save_pretrained(tmp_path)
        assert main(["plan", "--model", str(tmp_path), "--dtype", "bfloat16", "--tier", "12gb"]) == 0
        out = capsys.readouterr().out
        assert "28 layers" in out and "balanced" in out and "tier 12gb: OffloadConfig(num_layers_on_gpu=" in out

    def test_json_is_one_document(self, capsys, tmp_path):
        """--json prints one JSON object: the plan, every row with its VRAM terms, and the tier's config."""
        seven_b_config().save_pretrained(tmp_path)
        assert main(["plan", "--model", str(tmp_path / "config.json"), "--dtype", "bfloat16", "--json", "--tier", "24gb", "--every-k"]) == 0
        payload = json.loads(capsys.readouterr().out)
        assert payload["plan"]["num_layers"] == 28 and len(payload["rows"]) == 29
        assert payload["tier"]["num_layers_on_gpu"] == 28 and payload["tier"]["config"]["dtype"] is None

    def test_missing_model_exits_2(self, capsys, tmp_path):
        """A missing --model path is one error line naming the flag, and exit status 2."""
        assert main(["plan", "--model", str(tmp_path / "missing")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tracedoffload plan: error: --model=") and "config.json" in err and len(err.splitlines()) == 1

    @pytest.mark.parametrize(
        "flags, flag",
        [
            (["--bandwidth-gbps", "0"], "--bandwidth-gbps"),
            (["--compute-ms", "-1"], "--compute-ms"),
            (["--device-memory-gbps", "inf"], "--device-memory-gbps"),
            (["--kv-tokens", "-1"], "--kv-tokens"),
            (["--prefetch", "9"], "--prefetch"),
            (["--residency", "middle"], "--residency"),
            (["--tier", "10gb"], "--tier"),
        ],
    )
    def test_bad_flag_values_name_the_flag(self, capsys, tmp_path, flags, flag):
        """Each out-of-range flag value is one error line naming the flag, and exit status 2."""
        small_config().save_pretrained(tmp_path)
        assert main(["plan", "--model", str(tmp_path), *flags]) == 2
        assert f"error: {flag}=" in capsys.readouterr().err

    def test_unknown_dtype_is_refused_by_argparse(self, capsys):
        """An unknown --dtype is refused before planning, naming the flag and the choices."""
        with pytest.raises(SystemExit) as exit_:
            main(["plan", "--dtype", "int4"])
        assert exit_.value.code == 2 and "--dtype" in capsys.readouterr().err
