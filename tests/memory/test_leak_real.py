"""Leak detection on real allocations of the random model: injected leaks caught within 32
steps, and 100 normal generations (KV cache growing, batch sizes and lengths varying) raise nothing."""

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
    @pytest.mark.parametrize("kind, bytes_per_step", [("host", 40e6), ("device", 1.5e6)])
    def test_injected_leak_is_detected_within_32_steps(self, kind, bytes_per_step):
        """`run --inject-leak` leaks for real and the detector flags it before step 32, at about the leaked rate.

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
        assert alerts[0]["step_index"] < 32
        assert alerts[0]["bytes_per_step"] > bytes_per_step


class TestNoFalsePositives:
    def test_hundred_normal_generations_of_varying_batch_and_length_raise_nothing(self):
        """100 batched generates (1 to 4 sequences, prompts of 8 to 47 tokens, 8 to 31 new
        tokens), the KV cache growing every step and freed after each, raise no alert."""
        model = build_random_model()
        offloader = offload(model, OffloadConfig(num_layers_on_gpu=14))
        session = TracingSession([], policy=SamplingPolicy(level="token"))
        monitor = MemoryMonitor(offloader, kv_bytes_per_token(model.config, torch.float32))
        session.monitor_memory(monitor)
        session.attach(offloader)
        generator = torch.Generator().manual_seed(0)
        steps = generated = 0
        for generation in range(100):
            batch = 1 + generation % 4
            lengths = [8 + (generation * 7 + 13 * row) % 40 for row in range(batch)]
            new_tokens = 8 + (generation * 5) % 24
            # Left-padded to the longest prompt, as a batched generate takes it.
            input_ids = torch.zeros(batch, max(lengths), dtype=torch.long)
            attention_mask = torch.zeros(batch, max(lengths), dtype=torch.long)
            for row, length in enumerate(lengths):
                input_ids[row, -length:] = torch.randint(1, 256, (length,), generator=generator)
                attention_mask[row, -length:] = 1
            with torch.inference_mode(), session.generations("default", lengths, new_tokens):
                model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            steps += new_tokens
            generated += batch * new_tokens
        session.shutdown(10)
        offloader.detach()
        stats = session.snapshot()
        assert (stats["steps"], stats["generated_tokens"], stats["generations"]) == (steps, generated, 250)
        assert monitor.alerts == []
