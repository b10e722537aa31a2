"""`verify` and `run --verify`: the offloaded model against itself with every layer resident;
agreement on this CPU is exact, a corrupted copy is found at its first position, and the model
is left as it was."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tracedoffload import OffloadConfig
from tracedoffload._exceptions import ConfigError
from tracedoffload.models.random_model import ByteTokenizer
from tracedoffload.offloader import HOOK_ATTR
from tracedoffload.verify import verify_offload
from tests.tracing.test_batches import llama

PROMPT = "verify the offloader"
CONFIG = OffloadConfig(num_layers_on_gpu=2)  # layers 1 and 3 offloaded


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


class TestVerdict:
    def test_the_offloaded_model_agrees_exactly_and_is_left_as_it_was(self):
        model = llama(260)
        before = weights(model)
        verdict = verify_offload(model, ByteTokenizer(), PROMPT, 8, CONFIG, raw=True)
        assert verdict.identical and verdict.first_divergence is None
        assert len(verdict.positions) == 8 and verdict.max_abs_logit_diff == 0.0  # the same kernels on the same weights
        assert all(p.resident_token == p.offloaded_token for p in verdict.positions)
        assert verdict.offloaded_layers == (1, 3)
        after = weights(model)
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        assert not hasattr(model, HOOK_ATTR)

    def test_a_corrupted_copy_is_found_at_its_first_position(self):
        """The drill zeroes layer 3's device copy after each transfer: the first token's logits
        already differ, and the verdict stops there. The host copy was untouched, so the model
        answers as before once the offloader is gone."""
        model = llama(260)
        verdict = verify_offload(model, ByteTokenizer(), PROMPT, 8, CONFIG, raw=True, corrupt_layer=3)
        assert not verdict.identical and verdict.first_divergence == 0 and len(verdict.positions) == 1
        assert verdict.positions[0].max_abs_logit_diff > 1e-3
        assert verify_offload(model, ByteTokenizer(), PROMPT, 4, CONFIG, raw=True).identical

    @pytest.mark.parametrize("settings, field", [({"atol": -1.0}, "atol"), ({"corrupt_layer": 0}, "corrupt_layer")])
    def test_bad_settings_name_their_field(self, settings, field):
        with pytest.raises(ConfigError, match=field):
            verify_offload(llama(260), ByteTokenizer(), PROMPT, 2, CONFIG, raw=True, **settings)


def tracedoffload(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracedoffload", *argv], capture_output=True, text=True, timeout=300)


class TestCommand:
    def test_verify_prints_both_runs_and_exits_0_when_they_agree(self):
        done = tracedoffload("verify", "--model", "random", "--raw", "--prompt", PROMPT, "--max-new-tokens", "3", "--json")
        assert done.returncode == 0, done.stderr
        verdict = json.loads(done.stdout)
        assert verdict["identical"] and verdict["first_divergence"] is None and len(verdict["positions"]) == 3
        assert all(p["resident_token"] == p["offloaded_token"] for p in verdict["positions"])

    def test_verify_exits_1_at_the_first_diverging_position(self):
        done = tracedoffload("verify", "--model", "random", "--raw", "--prompt", PROMPT, "--max-new-tokens", "3", "--num-gpu-layers", "14", "--corrupt-layer", "1")
        assert done.returncode == 1, done.stderr
        assert "DIVERGED at position 0" in done.stdout and "<- diverges" in done.stdout

    def test_run_verify_compares_with_runs_flags(self):
        done = tracedoffload("run", "--verify", "--model", "random", "--raw", "--prompt", PROMPT, "--max-new-tokens", "2", "--preset", "aggressive")
        assert done.returncode == 0, done.stderr
        assert "identical: 2 tokens equal" in done.stdout

    @pytest.mark.parametrize(
        "argv, field",
        [
            (["run", "--verify", "--temperature", "0.5"], "temperature"),
            (["run", "--verify", "--prompt-lookup", "3"], "prompt_lookup"),
            (["verify", "--no-offload"], "no_offload"),
            (["verify", "--atol", "-1"], "atol"),
            (["verify", "--max-new-tokens", "0"], "max_new_tokens"),
        ],
    )
    def test_bad_flags_are_refused_by_name_before_loading(self, argv, field):
        done = tracedoffload(*argv)
        assert done.returncode == 2 and f"{field}=" in done.stderr and "loading" not in done.stderr
