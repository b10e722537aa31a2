"""A long run's trace without a long run: made-up layer timings fed through tracedoffload's own
telemetry pipeline (step timing, tail sampling, memory monitor, span factory, generation ledger,
JSON-lines exporter), so the file has exactly the shape a real run writes, in a second or two.

The model's thread is what is left out: its records (a copy, compute and release per offloaded
layer, a compute per resident one) are written here, as the offloader would hand them over on a
host clock, with device memory readings as a CUDA run takes them.
"""

from __future__ import annotations

import random
import time
import types
from pathlib import Path

import torch
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from tracedoffload import names
from tracedoffload._version import __version__
from tracedoffload.memory.monitor import MemoryMonitor
from tracedoffload.memory.probe import QuietPoint
from tracedoffload.timeline import COMPUTE, RELEASE, TRANSFER, LayerRecord
from tracedoffload.tracing.exporters.jsonl import OtlpJsonLinesExporter
from tracedoffload.tracing.fanout import ExportFanout, ExportSettings
from tracedoffload.tracing.generations import GenerationLedger, new_span_context
from tracedoffload.tracing.pipeline import StepPipeline
from tracedoffload.tracing.recorder import GenerationEnd, GenerationInfo, StepPayload, StepSequence
from tracedoffload.tracing.sampling import SamplingPolicy
from tracedoffload.tracing.session import SCOPE_NAME, default_resource, offload_span_attributes
from tracedoffload.tracing.stats import OffloadStats
from tracedoffload.tracing.step_spans import SpanFactory, StepTimer

LAYERS = 28  # the seeds' backbone, as the random model
PROMPT_TOKENS = 48
KV_BYTES_PER_TOKEN = 28_672  # the random model's (float32)
LAYER_BYTES = 2_953_216  # one offloaded layer of the random model
SLOW_EVERY = 250  # every this many steps, one layer computes 40x longer: the tail rule's slow steps
MODEL = "synthetic-28l"


def write_synthetic_trace(path: Path, steps: int, seed: int = 0) -> dict:
    """Write a trace of one generation of `steps` steps (a prefill, then decodes) to `path`, at the
    default sampling (layer spans for the first steps, one in 64, and the slow ones). Returns the
    statistics the pipeline aggregated as it went (what a live run prints)."""
    rng = random.Random(seed)
    offloaded = {layer for layer in range(LAYERS) if layer % 2 == 0}
    # The configuration a CUDA run's spans carry; the memory monitor reads this host (a probe of
    # a CUDA device would need one) and the device readings are made up below.
    configuration = types.SimpleNamespace(
        resident_indices=[layer for layer in range(LAYERS) if layer not in offloaded],
        offloaded_indices=sorted(offloaded),
        config=types.SimpleNamespace(prefetch=1, residency="interleaved"),
        pinned=True,
        device="cuda:0",
        offloaded_bytes=len(offloaded) * LAYER_BYTES,
        device_pool_bytes=2 * LAYER_BYTES,
        pinned_bytes=len(offloaded) * LAYER_BYTES,
    )
    host = types.SimpleNamespace(device=torch.device("cpu"), pinned_bytes=configuration.pinned_bytes)
    resource, scope = default_resource(), InstrumentationScope(SCOPE_NAME, __version__)
    exporter = OtlpJsonLinesExporter(path, append=False)
    # A queue that holds the whole run: the steps come far faster than a model makes them.
    fanout = ExportFanout([exporter], ExportSettings(max_queue_size=1 << 20, max_export_batch_size=4096))
    stats = OffloadStats()
    pipeline = StepPipeline(SamplingPolicy(), stats, fanout, GenerationLedger(resource, scope))
    pipeline.bind(StepTimer(lambda anchor, marker: anchor + marker, LAYERS, host_clock=True), SpanFactory(resource, scope, "h2d", offload_span_attributes(configuration)), None)
    pipeline.monitor = MemoryMonitor(host, KV_BYTES_PER_TOKEN)
    anchor = time.time_ns()
    info = GenerationInfo("0123456789abcdef", new_span_context(None), True, PROMPT_TOKENS, anchor)
    clock, position = 0, 0
    for index in range(steps):
        tokens = PROMPT_TOKENS if index == 0 else 1
        phase = names.PHASE_PREFILL if index == 0 else names.PHASE_DECODE
        records, end = _layer_records(rng, clock, offloaded, tokens, slow=index > 0 and index % SLOW_EVERY == 0)
        kv_tokens = position + tokens
        memory = QuietPoint(900 * 2**20 + rng.randrange(0, 2**20), 300 * 2**20 + kv_tokens * KV_BYTES_PER_TOKEN)
        sequence = StepSequence(info, position, phase, tokens, 1, index)
        payload = StepPayload(index, (sequence,), kv_tokens, rng.getrandbits(128), rng.getrandbits(64), anchor, clock, end, records, memory)
        pipeline.handle(payload)
        clock, position = end + rng.randrange(20_000, 60_000), kv_tokens
    attributes = {names.GEN_AI_OPERATION_NAME: names.GEN_AI_OPERATION, names.GEN_AI_REQUEST_MODEL: MODEL, names.GEN_AI_USAGE_INPUT_TOKENS: PROMPT_TOKENS}
    pipeline.handle(GenerationEnd(info, anchor + clock, steps, "length", attributes, None))
    if not fanout.shutdown(60) or fanout.lost():
        raise RuntimeError(f"the synthetic trace lost {fanout.lost()} spans on the way to {path}")
    return stats.snapshot()


def _layer_records(rng: random.Random, start: int, offloaded: set[int], tokens: int, slow: bool) -> tuple[list[LayerRecord], int]:
    """One forward's records from `start` (ns): each offloaded layer's copy issued when the layer
    before it starts computing (prefetch 1), its compute once both are done, then its release."""
    records, clock, previous_start, slot = [], start, start, 0
    slow_layer = rng.randrange(LAYERS) if slow else -1
    for layer in range(LAYERS):
        compute_ns = int(rng.gauss(450_000, 40_000) * (1 + tokens / 16)) * (40 if layer == slow_layer else 1)
        if layer in offloaded:
            copy_start = previous_start
            copy_end = copy_start + int(rng.gauss(380_000, 30_000))
            records.append(LayerRecord(TRANSFER, layer, copy_start, copy_end, LAYER_BYTES, slot, True))
            compute_start = max(clock, copy_end)
            records.append(LayerRecord(COMPUTE, layer, compute_start, compute_start + compute_ns, 0, slot, False))
            clock = compute_start + compute_ns
            records.append(LayerRecord(RELEASE, layer, clock, clock + 8_000, LAYER_BYTES, slot, False))
            clock += 8_000
            slot = 1 - slot
        else:
            compute_start = clock
            records.append(LayerRecord(COMPUTE, layer, compute_start, compute_start + compute_ns, 0, -1, False))
            clock = compute_start + compute_ns
        previous_start = compute_start
    return records, clock
