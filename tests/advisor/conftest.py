"""A hand-built measured run (round figures, so expected predictions are derived by hand in the
tests) and a real traced run of a tiny model, written by `tracedoffload run --trace-file`."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tracedoffload.advisor.measured import BatchFigures, MeasuredRun
from tracedoffload.cli import main

MS = 1_000_000  # nanoseconds


def hand_run(**overrides) -> MeasuredRun:
    """4 layers of 1 MB; the run kept layers 0 and 2 resident (interleaved), prefetch 1, on a CPU.

    Per step: resident layers compute 1 ms, offloaded ones 0.8 ms (factor 0.8); copies at 1 byte/ns
    (1 ms a layer); a release (swap) 0.05 ms; 0.5 ms outside the layers (0.1 of it the two
    swap-ins); 0.2 ms between steps. So one step: 3.6 + 2 + 0.1 + 0.5 = 6.2 ms, period 6.4 ms.
    Memory: base 10 MB, KV 1000 B/token x 100 tokens, activations 10 B/token x 50 + 2000 logits.
    """
    batch = BatchFigures(sequences=1, steps=8, compute_ns=(1 * MS, 0.8 * MS, 1 * MS, 0.8 * MS), other_ns=0.5 * MS, gap_ns=0.2 * MS, period_ns=6.4 * MS, kv_tokens=100)
    run = MeasuredRun(
        device="cpu",
        gpu_layers=2,
        prefetch=1,
        residency="interleaved",
        offloaded=(False, True, False, True),
        layer_bytes=(1_000_000,) * 4,
        base_bytes=10_000_000,
        kv_bytes_per_token=1000,
        activation_bytes_per_token=10,
        logits_bytes=2000,
        transfer_bytes_per_ns=1.0,
        swap_ns=0.05 * MS,
        largest_forward_tokens=50,
        batches=(batch,),
    )
    return dataclasses.replace(run, **overrides)


@pytest.fixture(scope="session")
def tiny_trace(tmp_path_factory):
    """A trace of `tracedoffload run` on a tiny 4-layer Qwen2 (2 resident), 8 tokens, at token level."""
    from tests.models.tiny import save_tiny_qwen2

    root = tmp_path_factory.mktemp("advise")
    save_tiny_qwen2(root / "tiny-qwen2")
    path = root / "run.otlp.jsonl"
    flags = ["--model", str(root / "tiny-qwen2"), "--num-gpu-layers", "2", "--max-new-tokens", "8", "--raw"]
    assert main(["run", *flags, "--trace-level", "token", "--trace-file", str(path), "--no-progress", "--json"]) == 0
    return path


def rewrite_spans(source, target, change) -> None:
    """Copy an OTLP JSON-lines file, calling `change(span)` on each span's JSON object."""
    lines = []
    for line in source.read_text().splitlines():
        request = json.loads(line)
        for resource_spans in request["resourceSpans"]:
            for scope_spans in resource_spans["scopeSpans"]:
                for span in scope_spans["spans"]:
                    change(span)
        lines.append(json.dumps(request))
    target.write_text("\n".join(lines) + "\n")
