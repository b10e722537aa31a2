"""`tracedoffload run`: one generation on the random model or a local directory, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tracedoffload.cli import main
from tracedoffload.models.random_model import RANDOM_MODEL_NAME

from tests.models.tiny import save_tiny_qwen2

# Each test in its own directory: the default traces/ of a run lands there, not in the checkout.
pytestmark = pytest.mark.usefixtures("in_tmp_dir")


def run_json(capsys, *flags: str) -> dict:
    """Run `tracedoffload run --json` with 4 new tokens (on the random model unless `flags` name
    one); return the printed summary."""
    model = () if "--model" in flags else ("--model", "random")
    assert main(["run", *model, "--max-new-tokens", "4", "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def run_error(capsys, *flags: str) -> str:
    """Run `tracedoffload run` expecting the bad-input exit code; return the error line."""
    model = () if "--model" in flags else ("--model", "random")
    assert main(["run", *model, "--max-new-tokens", "2", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("tracedoffload run: error: ")
    return err[-1]


class TestRunCommand:
    def test_text_summary(self, capsys):
        """A run prints the model, the layer split, the transfers and the output text."""
        assert main(["run", "--model", "random", "--max-new-tokens", "4"]) == 0
        out = capsys.readouterr().out
        for label in (RANDOM_MODEL_NAME, "resident layers", "offloaded layers", "device slot pool bytes", "GB/s", "prefetched", "output:"):
            assert label in out

    def test_json_summary_offloaded(self, capsys):
        """--json gives the figures: 4 tokens, a 12/16 split (balanced), copies of every offloaded layer."""
        summary = run_json(capsys)
        assert summary["model"] == RANDOM_MODEL_NAME
        assert summary["generated_tokens"] == 4
        assert (len(summary["resident_layers"]), len(summary["offloaded_layers"])) == (12, 16)
        assert summary["device_pool_bytes"] > 0
        stats = summary["stats"]
        assert stats["steps"] == stats["generated_tokens"] == 4 and (stats["gpu_layers"], stats["cpu_layers"]) == (12, 16)
        assert stats["bytes_transferred"] == sum(row["bytes"] for row in stats["per_layer"].values()) > 0
        assert stats["time_breakdown"]["cpu_to_gpu_transfer_ms"] > 0 and stats["time_breakdown"]["pure_computation_ms"] > 0
        assert 0.0 < stats["prefetched_share"] <= 1.0

    def test_manual_layers_first_residency_no_prefetch(self, capsys):
        """--num-gpu-layers, --residency and --prefetch reach the offloader."""
        summary = run_json(capsys, "--num-gpu-layers", "20", "--residency", "first", "--prefetch", "0")
        assert summary["resident_layers"] == list(range(20))
        assert summary["stats"]["prefetched_share"] == 0.0

    def test_no_offload(self, capsys):
        """--no-offload keeps every layer resident, untraced: no statistics rather than zeros."""
        summary = run_json(capsys, "--no-offload")
        assert summary["offload"] is False
        assert summary["offloaded_layers"] == [] and len(summary["resident_layers"]) == 28
        assert summary["stats"] is None

    def test_subprocess_json_stdout_is_clean(self):
        """`python -m tracedoffload.cli run --json` exits 0 with only JSON on stdout (logs on stderr)."""
        done = subprocess.run(
            [sys.executable, "-m", "tracedoffload.cli", "run", "--model", "random", "--max-new-tokens", "2", "--preset", "aggressive", "--json"],
            capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert len(summary["resident_layers"]) == 8
        assert "offload.attached" in done.stderr

    def test_python_dash_m_package(self):
        """`python -m tracedoffload` is the same command."""
        done = subprocess.run([sys.executable, "-m", "tracedoffload", "run", "--help"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "--num-gpu-layers" in done.stdout


class TestRunBadInput:
    def test_unknown_preset(self, capsys):
        """An unknown preset exits 2 naming the field and the valid presets."""
        line = run_error(capsys, "--preset", "ludicrous")
        assert "preset='ludicrous'" in line and "balanced" in line

    def test_more_layers_than_the_model_has(self, capsys):
        """--num-gpu-layers 99 exits 2 naming the field and the model's range."""
        line = run_error(capsys, "--num-gpu-layers", "99")
        assert "num_layers_on_gpu=99" in line and "0 to 28" in line

    def test_prefetch_out_of_range(self, capsys):
        """--prefetch 9 exits 2 naming the field and its range."""
        assert "prefetch=9" in run_error(capsys, "--prefetch", "9")

    @pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
    def test_cuda_without_a_gpu(self, capsys):
        """--device cuda on a machine without CUDA exits 2 naming the device."""
        assert "device='cuda'" in run_error(capsys, "--device", "cuda")

    def test_missing_model_path(self, capsys, tmp_path):
        """--model of a missing path exits 2 naming the path."""
        assert str(tmp_path / "absent") in run_error(capsys, "--model", str(tmp_path / "absent"))

    def test_preset_and_manual_layers_together(self, capsys):
        """--preset and --num-gpu-layers exclude each other (an argparse usage error, exit 2)."""
        with pytest.raises(SystemExit) as exited:
            main(["run", "--preset", "light", "--num-gpu-layers", "4"])
        assert exited.value.code == 2
        assert "not allowed with" in capsys.readouterr().err


class TestRunLocalModel:
    def test_save_pretrained_directory(self, capsys, tmp_path):
        """A tiny Qwen2 written by save_pretrained runs with --model, named after its directory."""
        directory = tmp_path / "tiny-qwen2"
        save_tiny_qwen2(directory)
        summary = run_json(capsys, "--model", str(directory), "--num-gpu-layers", "2")
        assert summary["model"] == "tiny-qwen2"
        assert (len(summary["resident_layers"]), len(summary["offloaded_layers"])) == (2, 2)
        assert summary["generated_tokens"] == 4
