"""Leak detection on real allocations of the random model: injected leaks caught within 32
tokens, and 100 normal generations (KV cache growing, prompt lengths varying) raise nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tracedoffload import OffloadConfig, offload
from tracedoffload.models.random_model import build_random_model
from tracedoffload.memory.monitor import MemoryMonitor
from tracedoffload.planner import kv_bytes_per_token
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import TracingSession


class TestInjectedLeaks:
    @pytest.mark.parametrize("kind, bytes_per_token", [("host", 40e6), ("device", 1.5e6)])
    def test_injected_leak_is_detected_within_32_tokens(self, kind, bytes_per_token):
        """`run --inject-leak` leaks for real and the detector flags it before token 32, at about the leaked rate.

        In its own process, as a user runs it: in the test process the heap freed by earlier tests
        takes the leaked blocks without the resident size growing, and whether it does depends on
        which tests ran before."""
        done = subprocess.run(
            [sys.executable, "-m", "tracedoffload", "run", "--model", "random", "--max-new-tokens", "32", "--inject-leak", kind, "--no-trace-file", "--json", "--no-progress"],
            capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        alerts = summary["leak_alerts"]
        assert alerts, f"no alert for an injected {kind} leak"
        assert alerts[0]["source"] == "host"  # without a GPU both leaks land in host memory
        assert alerts[0]["token_index"] < 32
        assert alerts[0]["bytes_per_token"] > bytes_per_token


class TestNoFalsePositives:
    def test_hundred_normal_generations_raise_nothing(self):
        """100 generations with the KV cache growing every token and varying prompts raise no alert."""
        model = build_random_model()
        offloader = offload(model, OffloadConfig(num_layers_on_gpu=14))
        session = TracingSession([], policy=SamplingPolicy(level="token"))
        monitor = MemoryMonitor(offloader, kv_bytes_per_token(model.config, torch.float32))
        session.monitor_memory(monitor)
        session.attach(offloader)
        generator = torch.Generator().manual_seed(0)
        for generation in range(100):
            length = 8 + (generation * 7) % 40
            prompt = torch.randint(0, 256, (1, length), generator=generator)
            with torch.inference_mode(), session.generation("default", length, 24):
                model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        session.shutdown(10)
        offloader.detach()
        assert session.snapshot()["tokens"] == 2400
        assert monitor.alerts == []
